"""How the API commands reach the service: the connection flags, the client, and the
mapping from what can go wrong on the way to an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import httpx
from pydantic import ValidationError

from raybatch.cli.exit_codes import ExitCode
from raybatch.client import RaybatchClient
from raybatch.exceptions import ApiRequestError, ConfigError

Command = Callable[[RaybatchClient, argparse.Namespace], int]


def connection_options() -> argparse.ArgumentParser:
    """A parent parser for every API command. SUPPRESS as default: the options work
    before or after the subcommand (`raybatch job --account a get J` and
    `raybatch job get J --account a`) without the subcommand's unset value wiping the
    group's. `-a/--account-id` is firectl's spelling."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--base-url", default=argparse.SUPPRESS, help="default $RAYBATCH_BASE_URL or http://127.0.0.1:8000")
    options.add_argument("--api-key", default=argparse.SUPPRESS, help="default $RAYBATCH_API_KEY")
    options.add_argument("-a", "--account", "--account-id", dest="account", default=argparse.SUPPRESS,
                         help="default $RAYBATCH_ACCOUNT")
    return options


def _default_client(args: argparse.Namespace) -> RaybatchClient:
    return RaybatchClient(
        base_url=getattr(args, "base_url", None),
        api_key=getattr(args, "api_key", None),
        account=getattr(args, "account", None),
    )


# Tests swap this for a client on an httpx.MockTransport.
client_factory: Callable[[argparse.Namespace], RaybatchClient] = _default_client


def with_client(command: Command) -> Callable[[argparse.Namespace], int]:
    """Turn `command(client, args)` into a handler: build the client, map errors to
    exit codes, close the client."""

    def handler(args: argparse.Namespace) -> int:
        try:
            with client_factory(args) as client:
                return command(client, args)
        except (ConfigError, ValidationError) as error:
            print(f"error: {error}", file=sys.stderr)
            return ExitCode.CONFIG
        except ApiRequestError as error:
            print(f"error: {error}", file=sys.stderr)
            return ExitCode.API
        except httpx.TransportError as error:
            print(f"error: cannot reach the service: {error}", file=sys.stderr)
            return ExitCode.API

    handler.__name__ = command.__name__
    return handler


def print_json(resource: dict) -> None:
    print(json.dumps(resource, indent=2))


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
