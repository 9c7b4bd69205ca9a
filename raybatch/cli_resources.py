"""`raybatch dataset ...` and `raybatch job ...`: the API's resources from the shell,
in the manner of Fireworks' firectl.

Exit status: 0 done (`wait`: the job COMPLETED); 1 the job ended FAILED, CANCELLED or
EXPIRED; 2 a setting is wrong (no key, no account, bad --extra-body); 4 the API refused
the request or could not be reached; 5 `wait --timeout` passed with the job still going.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from raybatch.client import RaybatchClient, resource_id
from raybatch.exceptions import ApiRequestError, ConfigError

EXIT_OK, EXIT_JOB_FAILED, EXIT_CONFIG, EXIT_API, EXIT_TIMEOUT = 0, 1, 2, 4, 5
# Above this size a file goes to a signed URL: the multipart route holds the whole
# request in the API process, a signed PUT streams straight to storage.
DIRECT_UPLOAD_MAX_BYTES = 150 * 1024 * 1024


def _default_client(args: argparse.Namespace) -> RaybatchClient:
    return RaybatchClient(
        base_url=getattr(args, "base_url", None),
        api_key=getattr(args, "api_key", None),
        account=getattr(args, "account", None),
    )


# Tests swap this for a client on an httpx.MockTransport.
_client_factory: Callable[[argparse.Namespace], RaybatchClient] = _default_client


def _with_client(command: Callable[[RaybatchClient, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn `command(client, args)` into a handler: build the client, map errors to
    exit codes, close the client."""

    def handler(args: argparse.Namespace) -> int:
        try:
            with _client_factory(args) as client:
                return command(client, args)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_CONFIG
        except ApiRequestError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_API
        except httpx.TransportError as error:
            print(f"error: cannot reach the service: {error}", file=sys.stderr)
            return EXIT_API

    handler.__name__ = command.__name__
    return handler


def _print_json(resource: dict) -> None:
    print(json.dumps(resource, indent=2))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


# ------------------------------------------------------------------------ datasets


def _upload(client: RaybatchClient, dataset_id: str, paths: list[str], signed: bool) -> dict:
    """Upload and validate; returns the dataset (READY, with its exampleCount)."""
    for path in paths:  # checked first: a typo must not leave half the files uploaded
        if not Path(path).is_file():
            raise ConfigError(f"no such file: {path}")
    if signed or len(paths) > 1 or Path(paths[0]).stat().st_size > DIRECT_UPLOAD_MAX_BYTES:
        return client.upload_dataset_signed(dataset_id, paths)
    client.upload_dataset(dataset_id, paths[0])
    return client.wait_dataset_validated(dataset_id)


def _dataset_create(client: RaybatchClient, args: argparse.Namespace) -> int:
    dataset = client.create_dataset(args.id, display_name=args.display_name)
    if args.file:
        dataset = _upload(client, args.id, [args.file], args.signed_upload)
    _print_json(dataset)
    return EXIT_OK


def _dataset_upload(client: RaybatchClient, args: argparse.Namespace) -> int:
    _print_json(_upload(client, args.id, args.paths, args.signed_upload))
    return EXIT_OK


def _dataset_get(client: RaybatchClient, args: argparse.Namespace) -> int:
    _print_json(client.get_dataset(args.id))
    return EXIT_OK


def _dataset_list(client: RaybatchClient, args: argparse.Namespace) -> int:
    rows = [
        [d.get("name", ""), d.get("state", ""), d.get("createTime", ""), d.get("exampleCount", "")]
        for d in client.iter_datasets(page_size=args.page_size)
    ]
    _print_table(["NAME", "STATE", "CREATE TIME", "EXAMPLES"], rows)
    return EXIT_OK


def _dataset_delete(client: RaybatchClient, args: argparse.Namespace) -> int:
    client.delete_dataset(args.id)
    print(f"deleted dataset {resource_id(args.id)}")
    return EXIT_OK


def _dataset_download(client: RaybatchClient, args: argparse.Namespace) -> int:
    try:
        paths = client.download_dataset(args.id, args.output_dir or resource_id(args.id), lineage=args.lineage)
    except ValueError as error:  # an unsafe file name from the server
        print(f"error: {error}", file=sys.stderr)
        return EXIT_API
    for path in paths:
        print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------- jobs


class _JobProgressBar:
    """A tqdm bar over jobProgress; on stderr, and only on a terminal (like `run`)."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(unit="line", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def __call__(self, job: dict) -> None:
        progress = job.get("jobProgress") or {}
        total = int(progress.get("totalInputRequests") or 0)
        self._bar.total = total or None  # 0 until the input is counted: no bogus 100 %
        self._bar.n = int(progress.get("totalProcessedRequests") or 0)
        state = str(job.get("state", "")).removeprefix("JOB_STATE_")
        self._bar.set_postfix(state=state, failed=progress.get("failedRequests", 0), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _wait_and_report(client: RaybatchClient, job_id: str, timeout) -> int:
    bar = _JobProgressBar()
    try:
        job = client.wait_job(job_id, on_update=bar, timeout=timeout)
    except TimeoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        bar.close()
    _print_json(job)
    return EXIT_OK if job.get("state") == "JOB_STATE_COMPLETED" else EXIT_JOB_FAILED


def _job_create(client: RaybatchClient, args: argparse.Namespace) -> int:
    if args.extra_body is not None:
        try:
            parsed = json.loads(args.extra_body)
        except ValueError as error:
            raise ConfigError(f"--extra-body is not valid JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("--extra-body must be a JSON object")
    parameters = {
        "maxTokens": args.max_tokens,
        "temperature": args.temperature,
        "topP": args.top_p,
        "topK": args.top_k,
        "n": args.n,
        "extraBody": args.extra_body,
    }
    job = client.create_job(
        model=args.model,
        input_dataset_id=args.input_dataset_id,
        job_id=args.job_id,
        output_dataset_id=args.output_dataset_id,
        display_name=args.display_name,
        inference_parameters=parameters,
        precision=args.precision,
        continued_from_job_name=args.continued_from,
    )
    if args.wait:
        return _wait_and_report(client, job["name"], args.timeout)
    _print_json(job)
    return EXIT_OK


def _job_get(client: RaybatchClient, args: argparse.Namespace) -> int:
    _print_json(client.get_job(args.id))
    return EXIT_OK


def _job_list(client: RaybatchClient, args: argparse.Namespace) -> int:
    jobs = client.iter_jobs(page_size=args.page_size, order_by=args.order_by, filter=args.filter)
    rows = [
        [j.get("name", ""), j.get("state", ""), j.get("createTime", ""), f"{(j.get('jobProgress') or {}).get('percent', 0)}%"]
        for j in jobs
    ]
    _print_table(["NAME", "STATE", "CREATE TIME", "PERCENT"], rows)
    return EXIT_OK


def _job_cancel(client: RaybatchClient, args: argparse.Namespace) -> int:
    _print_json(client.cancel_job(args.id))
    return EXIT_OK


def _job_delete(client: RaybatchClient, args: argparse.Namespace) -> int:
    client.delete_job(args.id)
    print(f"deleted job {resource_id(args.id)}")
    return EXIT_OK


def _job_wait(client: RaybatchClient, args: argparse.Namespace) -> int:
    return _wait_and_report(client, args.id, args.timeout)


def _engines(client: RaybatchClient, args: argparse.Namespace) -> int:
    replicas = client.list_engines()["replicas"]
    if args.json:
        print(json.dumps(replicas, indent=2))
        return EXIT_OK
    rows = [
        [
            r["replicaId"], r["model"], r["precisionKey"], (r.get("node") or "-")[:12],
            f"{r['gpus']}{' ' + r['acceleratorType'] if r.get('acceleratorType') else ''}", r["state"],
            str(r["rowsInFlight"]), str(r["rowsQueued"]),
            time.strftime("%H:%M:%S", time.localtime(r["idleSince"])) if r.get("idleSince") else "-",
        ]
        for r in replicas
    ]
    _print_table(["REPLICA", "MODEL", "SPEC", "NODE", "GPUS", "STATE", "IN FLIGHT", "QUEUED", "IDLE SINCE"], rows)
    return EXIT_OK


# ------------------------------------------------------------------------- parsers


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS as default: the options work before or after the subcommand
    # (`raybatch job --account a get J` and `raybatch job get J --account a`) without
    # the subcommand's unset value wiping the group's.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--base-url", default=argparse.SUPPRESS, help="default $RAYBATCH_BASE_URL or http://127.0.0.1:8000")
    options.add_argument("--api-key", default=argparse.SUPPRESS, help="default $RAYBATCH_API_KEY")
    options.add_argument("--account", default=argparse.SUPPRESS, help="default $RAYBATCH_ACCOUNT")
    return options


def _command(group, name: str, help: str, command, parents) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help, parents=parents)
    parser.set_defaults(handler=_with_client(command))
    return parser


def _dataset_parsers(sub, parents) -> None:
    dataset = sub.add_parser("dataset", help="datasets: create, upload, get, list, delete, download", parents=parents)
    group = dataset.add_subparsers(dest="dataset_command", required=True)
    signed_help = "PUT to a signed URL (always used above 150 MB)"
    create = _command(group, "create", "create a dataset, and upload a file into it with --file", _dataset_create, parents)
    create.add_argument("id")
    create.add_argument("--display-name")
    create.add_argument("--file", help="a .jsonl file to upload into the new dataset")
    create.add_argument("--signed-upload", action="store_true", help=signed_help)
    upload = _command(group, "upload", "upload files into a dataset", _dataset_upload, parents)
    upload.add_argument("id")
    upload.add_argument("paths", nargs="+", metavar="PATH", help="more than one: signed upload")
    upload.add_argument("--signed-upload", action="store_true", help=signed_help)
    _command(group, "get", "print a dataset as JSON", _dataset_get, parents).add_argument("id")
    listing = _command(group, "list", "list every dataset of the account", _dataset_list, parents)
    listing.add_argument("--page-size", type=int)
    _command(group, "delete", "delete a dataset", _dataset_delete, parents).add_argument("id")
    download = _command(group, "download", "download a dataset's files", _dataset_download, parents)
    download.add_argument("id")
    download.add_argument("--output-dir", help="default ./ID")
    download.add_argument("--lineage", action="store_true", help="also the datasets it was made from")


def _job_parsers(sub, parents) -> None:
    job = sub.add_parser("job", help="batch inference jobs: create, get, list, cancel, delete, wait", parents=parents)
    group = job.add_subparsers(dest="job_command", required=True)
    create = _command(group, "create", "start a batch inference job", _job_create, parents)
    create.add_argument("--model", help="required unless --continued-from")
    create.add_argument("--input-dataset-id", help="required unless --continued-from")
    create.add_argument("--job-id")
    create.add_argument("--output-dataset-id", help="default: a new dataset")
    create.add_argument("--display-name")
    create.add_argument("--max-tokens", type=int)
    create.add_argument("--temperature", type=float)
    create.add_argument("--top-p", type=float)
    create.add_argument("--top-k", type=int)
    create.add_argument("--n", type=int)
    create.add_argument("--extra-body", help="JSON object of further body fields for every row")
    create.add_argument("--precision")
    create.add_argument("--continued-from", metavar="JOB", help="go on from this job's results")
    create.add_argument("--wait", action="store_true", help="wait for the job to end, showing progress")
    create.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    _command(group, "get", "print a job as JSON", _job_get, parents).add_argument("id")
    listing = _command(group, "list", "list the account's jobs", _job_list, parents)
    listing.add_argument("--page-size", type=int)
    listing.add_argument("--order-by")
    listing.add_argument("--filter")
    _command(group, "cancel", "cancel a job; partial results are kept", _job_cancel, parents).add_argument("id")
    _command(group, "delete", "delete a job (its output dataset stays)", _job_delete, parents).add_argument("id")
    wait = _command(group, "wait", "wait for a job to end, showing progress", _job_wait, parents)
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


def add_resource_commands(sub) -> None:
    """Add `dataset`, `job` and `engines` to the subparsers of `raybatch`."""
    parents = [_connection_options()]
    _dataset_parsers(sub, parents)
    _job_parsers(sub, parents)
    engines = _command(sub, "engines", "list the engine pool's replicas (needs an admin account's key)", _engines, parents)
    engines.add_argument("--json", action="store_true", help="print the replicas as JSON")
