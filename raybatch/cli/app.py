"""The `raybatch` command line: the parser tree and `main`.

Resource commands exist in two spellings built from the same `Verb`s:
- raybatch's own, noun first: `raybatch job create`, `raybatch dataset download`
  (`batch-inference-job` is accepted for `job`, as in firectl's newer noun-first form);
- firectl's, verb first: `raybatch create batch-inference-job`,
  `raybatch download dataset` (the plural names are accepted too).
Exit codes: `raybatch.cli.exit_codes.ExitCode`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from pydantic import ValidationError

from raybatch.cli.connection import connection_options, with_client
from raybatch.cli.datasets import DATASET_VERBS
from raybatch.cli.engines import ENGINES
from raybatch.cli.exit_codes import ExitCode
from raybatch.cli.jobs import JOB_VERBS
from raybatch.cli.run import add_run_commands
from raybatch.cli.service import add_service_commands
from raybatch.cli.verbs import Verb
from raybatch.exceptions import ConfigError

# noun: (its verbs, the other names it answers to)
_RESOURCES = {
    "dataset": (DATASET_VERBS, ["datasets"]),
    "batch-inference-job": (JOB_VERBS, ["batch-inference-jobs", "job", "jobs"]),
}
# firectl's verbs for these resources; raybatch's own (upload, cancel, wait) stay noun first.
FIRECTL_VERBS = ("create", "get", "list", "delete", "download")


def _add_verb(group, name: str, verb: Verb, parents, aliases=()) -> argparse.ArgumentParser:
    parser = group.add_parser(name, aliases=list(aliases), help=verb.help, parents=parents)
    verb.add_arguments(parser)
    parser.set_defaults(handler=with_client(verb.run))
    return parser


def _add_noun_first(sub, parents) -> None:
    for noun, verbs, aliases in (("dataset", DATASET_VERBS, []), ("job", JOB_VERBS, ["batch-inference-job"])):
        parser = sub.add_parser(noun, aliases=aliases, help=f"{noun}s: {', '.join(verbs)}", parents=parents)
        group = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
        for name, verb in verbs.items():
            _add_verb(group, name, verb, parents)


def _add_verb_first(sub, parents) -> None:
    for name in FIRECTL_VERBS:
        nouns = {noun: (verbs[name], aliases) for noun, (verbs, aliases) in _RESOURCES.items() if name in verbs}
        parser = sub.add_parser(name, help=f"firectl's form: {name} {' | '.join(nouns)}", parents=parents)
        group = parser.add_subparsers(dest="resource", required=True, metavar="RESOURCE")
        for noun, (verb, aliases) in nouns.items():
            command = _add_verb(group, noun, verb, parents, aliases)
            if name == "download":
                command.set_defaults(output_dir=".")  # firectl downloads into the current folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raybatch", description="Batch LLM inference on Ray, Fireworks-compatible.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(sub)
    add_service_commands(sub)
    parents = [connection_options()]
    _add_noun_first(sub, parents)
    _add_verb_first(sub, parents)
    _add_verb(sub, "engines", ENGINES, parents)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return int(args.handler(args))
    except (ConfigError, ValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return int(ExitCode.CONFIG)
