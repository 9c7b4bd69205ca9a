"""The `raybatch` command.

Modules, one job each:
- app: the parser tree (raybatch's noun-first and firectl's verb-first forms) and `main`
- exit_codes: `ExitCode`, the exit status of every command
- sampling: the sampling flags, derived from `InferenceParameters`
- connection: connection flags, the API client, errors -> exit codes, printing
- verbs: `Verb`, one resource command independent of its spelling
- datasets, jobs, engines: the API commands
- run: `raybatch run` and `tiny-model`; service: `up`, `down`, `keys`
"""

from raybatch.cli.app import main

__all__ = ["main"]
