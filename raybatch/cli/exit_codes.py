"""The exit status of every `raybatch` command, in one place so that scripts can rely
on a number meaning the same thing whichever command returned it."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    # The work ended without finishing: a job ended FAILED, CANCELLED or EXPIRED; a
    # `raybatch run` left lines uncommitted (run it again to finish them).
    FAILED = 1
    # A setting is wrong (no key, no account, a bad flag value, a missing file); nothing
    # was sent or started.
    CONFIG = 2
    # `raybatch run` stopped at its output cap; committed output is kept, a run with a
    # larger cap finishes the rest.
    OUTPUT_CAP = 3
    # The API refused the request (the error is printed) or could not be reached.
    API = 4
    # `--timeout` passed while waiting; the job goes on running.
    TIMEOUT = 5
