"""The batch inference job commands: create, get, list, cancel, delete, wait."""

from __future__ import annotations

import argparse
import sys

from raybatch.cli.connection import print_json, print_table
from raybatch.cli.exit_codes import ExitCode
from raybatch.cli.sampling import add_sampling_flags, sampling_parameters
from raybatch.cli.verbs import Verb, add_id, add_list_arguments
from raybatch.client import RaybatchClient, resource_id


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
        return ExitCode.TIMEOUT
    finally:
        bar.close()
    print_json(job)
    return ExitCode.OK if job.get("state") == "JOB_STATE_COMPLETED" else ExitCode.FAILED


def create_body(args: argparse.Namespace) -> dict:
    """The keyword arguments of `RaybatchClient.create_job` that the flags stand for."""
    parameters = sampling_parameters(args).model_dump(by_alias=True, exclude_none=True)
    return {
        "model": args.model,
        "input_dataset_id": args.input_dataset_id,
        "job_id": args.job_id,
        "output_dataset_id": args.output_dataset_id,
        "display_name": args.display_name,
        "inference_parameters": parameters,
        "precision": args.precision,
        "continued_from_job_name": args.continued_from,
    }


def _create(client: RaybatchClient, args: argparse.Namespace) -> int:
    if args.dry_run:  # lines, bad lines by code, input tokens; nothing runs
        print_json(client.create_job(**create_body(args), dry_run=True))
        return ExitCode.OK
    job = client.create_job(**create_body(args))
    if args.wait:
        return _wait_and_report(client, job["name"], args.timeout)
    print_json(job)
    return ExitCode.OK


def _create_arguments(parser: argparse.ArgumentParser) -> None:
    # The short flags and --continue-from are firectl's; the long forms are the API's fields.
    parser.add_argument("-m", "--model", help="required unless --continue-from")
    parser.add_argument("-d", "--input-dataset-id", help="required unless --continue-from")
    parser.add_argument("-x", "--output-dataset-id", help="default: a new dataset JOB_ID-output")
    parser.add_argument("--job-id", help="default: generated")
    parser.add_argument("--display-name")
    add_sampling_flags(parser)
    parser.add_argument("--precision", help="e.g. BF16, FP16, FP8 (default: the model's own)")
    parser.add_argument("--continue-from", "--continued-from", dest="continued_from", metavar="JOB",
                        help="go on from this job (ID or name): only the lines it left unfinished run")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end, showing progress")
    parser.add_argument("--dry-run", action="store_true", help="run nothing: validate the input against the "
                        "model and print line counts, bad lines by error code and input tokens")
    parser.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")


def _get(client: RaybatchClient, args: argparse.Namespace) -> int:
    print_json(client.get_job(args.id))
    return ExitCode.OK


def _list(client: RaybatchClient, args: argparse.Namespace) -> int:
    jobs = client.iter_jobs(page_size=args.page_size, order_by=args.order_by, filter=args.filter)
    rows = [
        [j.get("name", ""), j.get("state", ""), j.get("createTime", ""), f"{(j.get('jobProgress') or {}).get('percent', 0)}%"]
        for j in jobs
    ]
    print_table(["NAME", "STATE", "CREATE TIME", "PERCENT"], rows)
    return ExitCode.OK


def _cancel(client: RaybatchClient, args: argparse.Namespace) -> int:
    print_json(client.cancel_job(args.id))
    return ExitCode.OK


def _delete(client: RaybatchClient, args: argparse.Namespace) -> int:
    client.delete_job(args.id)
    print(f"deleted job {resource_id(args.id)}")
    return ExitCode.OK


def _wait(client: RaybatchClient, args: argparse.Namespace) -> int:
    return _wait_and_report(client, args.id, args.timeout)


def _wait_arguments(parser: argparse.ArgumentParser) -> None:
    add_id(parser)
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


JOB_VERBS = {
    "create": Verb("start a batch inference job", _create, _create_arguments),
    "get": Verb("print a job as JSON", _get, add_id),
    "list": Verb("list the account's jobs", _list, add_list_arguments),
    "cancel": Verb("cancel a job; partial results are kept", _cancel, add_id),
    "delete": Verb("delete a job (its output dataset stays)", _delete, add_id),
    "wait": Verb("wait for a job to end, showing progress", _wait, _wait_arguments),
}
