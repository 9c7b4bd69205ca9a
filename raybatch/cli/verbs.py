"""What a resource command is, independent of how it is spelled on the command line:
`raybatch job create` and firectl's `raybatch create batch-inference-job` are built
from the same `Verb`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from raybatch.cli.connection import Command


@dataclass(frozen=True)
class Verb:
    help: str
    run: Command
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def add_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="an ID or a full resource name (accounts/A/.../ID)")


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-size", type=int, help="per request; every page is listed")
    parser.add_argument("--order-by", help='e.g. "createTime desc"')
    parser.add_argument("--filter", help="AIP-160, e.g. 'state=\"JOB_STATE_RUNNING\"'")
