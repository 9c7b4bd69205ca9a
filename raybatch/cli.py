"""The `raybatch` command.

Exit status of `raybatch run`: 0 every line processed (some may be error rows);
2 a setting is wrong (nothing ran); 3 output cap reached (committed output kept;
run again with a larger cap to finish); 1 anything else, including a run that ended
with lines uncommitted (run again to finish them).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_OUTPUT_CAP = 3


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="run one batch job on the Ray cluster in RAY_ADDRESS or a local one")
    run.add_argument("--input", required=True, help=".jsonl file or folder/prefix of shards (path, file://, s3://)")
    run.add_argument("--output", required=True, help="folder/prefix for results.jsonl and errors.jsonl")
    run.add_argument("--model", required=True, help="Hugging Face model ID or local path")
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--temperature", type=float)
    run.add_argument("--top-p", type=float)
    run.add_argument("--top-k", type=int)
    run.add_argument("--n", type=int)
    run.add_argument("--extra-body", help="JSON object of further body fields for every row")
    run.add_argument("--precision", default="PRECISION_UNSPECIFIED")
    run.add_argument("--output-cap-bytes", type=int, help="default 8 GiB")
    run.add_argument("--max-line-bytes", type=int, help="default 1 MiB")
    run.add_argument("--replicas", type=int, help="engine replicas (default: one per GPU group, or 1 on CPU)")
    run.add_argument("--tensor-parallel-size", type=int, default=1)
    run.add_argument("--max-model-len", type=int)
    run.add_argument("--config", help="JSON file of further RunConfig fields")


def _build_config(args: argparse.Namespace):
    from raybatch.config import RunConfig

    fields: dict = json.loads(Path(args.config).read_text()) if args.config else {}
    fields.update(input=args.input, output=args.output, model=args.model, precision=args.precision)
    parameters = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "n": args.n,
        "extra_body": args.extra_body,
    }
    fields["inference_parameters"] = {k: v for k, v in parameters.items() if v is not None}
    for name in ("output_cap_bytes", "max_line_bytes"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    engine = fields.setdefault("engine", {})
    engine["tensor_parallel_size"] = args.tensor_parallel_size
    if args.replicas:
        engine["replicas"] = args.replicas
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    return RunConfig.model_validate(fields)


class _ProgressBar:
    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(unit="line", disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def __call__(self, status) -> None:
        progress = status.progress
        self._bar.total = progress.total_input_requests
        self._bar.n = progress.total_processed_requests
        self._bar.set_postfix(errors=progress.failed_requests, tokens=progress.output_tokens, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _print_summary(summary) -> None:
    p = summary.status.progress
    print(
        f"{summary.state}: {p.total_processed_requests}/{p.total_input_requests} lines "
        f"({p.successfully_processed_requests} succeeded, {p.failed_requests} failed, "
        f"{summary.blank_lines} blank skipped)\n"
        f"tokens: {p.input_tokens} in ({p.cached_input_token_count} cached), {p.output_tokens} out\n"
        f"wall time: {summary.wall_seconds:.1f} s, {summary.tokens_per_second:.0f} tokens/s\n"
        f"output: {summary.status.committed_bytes} bytes committed"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from raybatch.exceptions import ConfigError, IncompleteRunError, OutputConflictError
    from raybatch.runner import run_job

    try:
        config = _build_config(args)
    except (ValidationError, ValueError) as exc:
        print(f"raybatch run: invalid settings: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    bar = _ProgressBar()
    try:
        summary = run_job(config, on_progress=bar)
    except (ConfigError, OutputConflictError) as exc:
        print(f"raybatch run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except IncompleteRunError as exc:
        print(f"raybatch run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
    _print_summary(summary)
    if summary.state == "output_cap_reached":
        print(
            f"output_cap_reached: committed output stopped at the cap of {config.output_cap_bytes} "
            "bytes; the remaining lines were not processed",
            file=sys.stderr,
        )
        return EXIT_OUTPUT_CAP
    return EXIT_OK


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from raybatch.tiny_model import build_tiny_model

    print(build_tiny_model(args.path, seed=args.seed, shape=args.shape))
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="raybatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    tiny = sub.add_parser("tiny-model", help="write a tiny random Llama for tests and demos")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shape", choices=["tiny", "small", "bench"], default="tiny",
                      help="tiny: ~1M parameters (tests, demo); small: ~13M; bench: ~110M")
    from raybatch.cli_service import add_service_commands
    from raybatch.exceptions import ConfigError

    add_service_commands(sub)
    from raybatch.cli_resources import add_resource_commands

    add_resource_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    handlers = {"run": _cmd_run, "tiny-model": _cmd_tiny_model}
    handler = getattr(args, "handler", None) or handlers[args.command]
    try:
        return handler(args)
    except (ConfigError, ValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
