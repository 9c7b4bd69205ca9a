"""The dataset commands: create (and upload a file into it), upload, get, list,
delete, download."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raybatch.cli.connection import print_json, print_table
from raybatch.cli.exit_codes import ExitCode
from raybatch.cli.verbs import Verb, add_id, add_list_arguments
from raybatch.client import RaybatchClient, resource_id
from raybatch.exceptions import ConfigError

# Above this size a file goes to a signed URL: the multipart route holds the whole
# request in the API process, a signed PUT streams straight to storage.
DIRECT_UPLOAD_MAX_BYTES = 150 * 1024 * 1024
_SIGNED_HELP = "PUT to a signed URL (always used above 150 MB)"


def _upload(client: RaybatchClient, dataset_id: str, paths: list[str], signed: bool) -> dict:
    """Upload and validate; returns the dataset (READY, with its exampleCount)."""
    for path in paths:  # checked first: a typo must not leave half the files uploaded
        if not Path(path).is_file():
            raise ConfigError(f"no such file: {path}")
    if signed or len(paths) > 1 or Path(paths[0]).stat().st_size > DIRECT_UPLOAD_MAX_BYTES:
        return client.upload_dataset_signed(dataset_id, paths)
    client.upload_dataset(dataset_id, paths[0])
    return client.wait_dataset_validated(dataset_id)


def _create(client: RaybatchClient, args: argparse.Namespace) -> int:
    if args.path and args.file:
        raise ConfigError("give the file once: as FILE or as --file")
    path = args.path or args.file
    if path and args.external_url:
        raise ConfigError("give a FILE to upload or an --external-url to read in place, not both")
    if path and not Path(path).is_file():  # before the dataset exists: no empty leftover
        raise ConfigError(f"no such file: {path}")
    dataset = client.create_dataset(args.id, display_name=args.display_name, external_url=args.external_url,
                                    format=args.format)
    if args.external_url:
        dataset = client.wait_dataset_validated(args.id)
    elif path:
        dataset = _upload(client, args.id, [path], args.signed_upload)
    print_json(dataset)
    return ExitCode.OK


def _create_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="the new dataset's ID")
    parser.add_argument("path", nargs="?", metavar="FILE", help="a .jsonl file to upload into it (firectl's form)")
    parser.add_argument("--file", help="the same as FILE")
    parser.add_argument("--display-name")
    parser.add_argument("--external-url", help="read the dataset in place from this s3://, gs:// or https:// "
                        "prefix or file (never copied); waits until it is READY")
    parser.add_argument("--format", choices=["FORMAT_UNSPECIFIED", "CHAT", "COMPLETION", "RL"])
    parser.add_argument("--signed-upload", action="store_true", help=_SIGNED_HELP)


def _upload_command(client: RaybatchClient, args: argparse.Namespace) -> int:
    print_json(_upload(client, args.id, args.paths, args.signed_upload))
    return ExitCode.OK


def _upload_arguments(parser: argparse.ArgumentParser) -> None:
    add_id(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="more than one: signed upload")
    parser.add_argument("--signed-upload", action="store_true", help=_SIGNED_HELP)


def _get(client: RaybatchClient, args: argparse.Namespace) -> int:
    print_json(client.get_dataset(args.id))
    return ExitCode.OK


def _list(client: RaybatchClient, args: argparse.Namespace) -> int:
    datasets = client.iter_datasets(page_size=args.page_size, order_by=args.order_by, filter=args.filter)
    rows = [[d.get("name", ""), d.get("state", ""), d.get("createTime", ""), d.get("exampleCount", "")] for d in datasets]
    print_table(["NAME", "STATE", "CREATE TIME", "EXAMPLES"], rows)
    return ExitCode.OK


def _delete(client: RaybatchClient, args: argparse.Namespace) -> int:
    client.delete_dataset(args.id)
    print(f"deleted dataset {resource_id(args.id)}")
    return ExitCode.OK


def _download(client: RaybatchClient, args: argparse.Namespace) -> int:
    try:
        paths = client.download_dataset(args.id, args.output_dir or resource_id(args.id), lineage=args.lineage)
    except ValueError as error:  # an unsafe file name from the server
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.API
    for path in paths:
        print(path)
    return ExitCode.OK


def _download_arguments(parser: argparse.ArgumentParser) -> None:
    add_id(parser)
    parser.add_argument("--output-dir", help="default ./ID (firectl's form `download dataset`: .)")
    parser.add_argument("--lineage", "--download-lineage", dest="lineage", action="store_true",
                        help="also the datasets it was made from (a continued job's earlier outputs)")


DATASET_VERBS = {
    "create": Verb("create a dataset; with FILE (or --file) upload it and wait until READY", _create, _create_arguments),
    "upload": Verb("upload files into a dataset", _upload_command, _upload_arguments),
    "get": Verb("print a dataset as JSON", _get, add_id),
    "list": Verb("list the account's datasets", _list, add_list_arguments),
    "delete": Verb("delete a dataset", _delete, add_id),
    "download": Verb("download a dataset's files", _download, _download_arguments),
}
