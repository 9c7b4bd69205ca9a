"""`raybatch up | down | keys`: run the service and manage its API keys."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raybatch.cli.exit_codes import ExitCode


def _service_config(args: argparse.Namespace):
    from raybatch.config import ServiceConfig

    fields = json.loads(Path(args.config).read_text()) if getattr(args, "config", None) else {}
    if args.storage:
        fields["storage"] = args.storage
    return ServiceConfig.model_validate(fields)


def _cmd_up(args: argparse.Namespace) -> int:
    from raybatch.service import up

    base_url = up(_service_config(args), port=args.port, address=args.address, host=args.host, num_cpus=args.num_cpus,
                  tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port)
    print(base_url)
    return ExitCode.OK


def _cmd_down(args: argparse.Namespace) -> int:
    from raybatch.service import down

    print(f"stopped {down()}")
    return ExitCode.OK


def _cmd_keys(args: argparse.Namespace) -> int:
    from raybatch.api.auth import create_key, revoke_key
    from raybatch.store import Store

    store = Store(_service_config(args).storage)
    if args.keys_command == "create":
        key, record = create_key(store, args.account)
        print(f"created key {record.key_id} for account {record.account}; it is shown once, store it now:")
        print(key)  # the last line: scripts take it with `tail -n 1`
    elif args.keys_command == "list":
        for record in sorted(store.list_keys(), key=lambda r: r.create_time):
            state = "revoked" if record.revoked else "active"
            print(f"{record.key_id}  {record.account:<24} {record.create_time:%Y-%m-%d %H:%M:%S}  {state}")
    else:
        try:
            revoke_key(store, args.key_id)
        except KeyError:
            print(f"error: no key {args.key_id}")
            return ExitCode.FAILED
        print(f"revoked {args.key_id}")
    return ExitCode.OK


def add_service_commands(sub) -> None:
    storage_help = "storage root (local folder, file://, s3://); default $RAYBATCH_STORAGE or ~/.raybatch/storage"
    up = sub.add_parser("up", help="start the service (a local Ray, or join --address) and print its base URL")
    up.add_argument("--storage", help=storage_help)
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--host", default="127.0.0.1", help="address the API listens on (0.0.0.0: every interface)")
    up.add_argument("--tls-cert", help="PEM certificate (chain included) to serve the API over HTTPS; with --tls-key. "
                    "Without them the API is plain HTTP and API keys cross the network in clear text")
    up.add_argument("--tls-key", help="PEM private key of --tls-cert")
    up.add_argument("--address", help="join this Ray cluster instead of starting one (also RAY_ADDRESS)")
    up.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: max(4, cores))")
    up.add_argument("--metrics-port", type=int, help="port of Ray's Prometheus metrics (raybatch_* among them) "
                    "at 127.0.0.1:PORT/metrics; outside Ray's worker ports 10002-19999")
    up.add_argument("--config", help="JSON file of further ServiceConfig fields (models, limits, ...)")
    up.set_defaults(handler=_cmd_up)
    down = sub.add_parser("down", help="stop what `raybatch up` started")
    down.set_defaults(handler=_cmd_down)
    keys = sub.add_parser("keys", help="API keys: create, list, revoke (works on the storage directly)")
    keys.add_argument("--storage", help=storage_help)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key for an account; prints it once, as the last line")
    create.add_argument("--account", required=True)
    keys_sub.add_parser("list", help="key IDs, accounts, state (never the keys)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its ID")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=_cmd_keys)
