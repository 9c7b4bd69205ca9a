"""`raybatch engines`: the engine pool's replicas, for an admin account."""

from __future__ import annotations

import argparse
import json
import time

from raybatch.cli.connection import print_table
from raybatch.cli.exit_codes import ExitCode
from raybatch.cli.verbs import Verb
from raybatch.client import RaybatchClient


def _engines(client: RaybatchClient, args: argparse.Namespace) -> int:
    replicas = client.list_engines()["replicas"]
    if args.json:
        print(json.dumps(replicas, indent=2))
        return ExitCode.OK
    rows = [
        [
            r["replicaId"], r["model"], r["precisionKey"], (r.get("node") or "-")[:12],
            f"{r['gpus']}{' ' + r['acceleratorType'] if r.get('acceleratorType') else ''}", r["state"],
            str(r["rowsInFlight"]), str(r["rowsQueued"]),
            time.strftime("%H:%M:%S", time.localtime(r["idleSince"])) if r.get("idleSince") else "-",
        ]
        for r in replicas
    ]
    print_table(["REPLICA", "MODEL", "SPEC", "NODE", "GPUS", "STATE", "IN FLIGHT", "QUEUED", "IDLE SINCE"], rows)
    return ExitCode.OK


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the replicas as JSON")


ENGINES = Verb("list the engine pool's replicas (needs an admin account's key)", _engines, _arguments)
