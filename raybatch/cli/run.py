"""`raybatch run` (one batch job on a Ray cluster, without the service) and
`raybatch tiny-model`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from raybatch.cli.exit_codes import ExitCode
from raybatch.cli.sampling import add_sampling_flags, sampling_parameters


def _build_config(args: argparse.Namespace):
    from raybatch.config import RunConfig

    fields: dict = json.loads(Path(args.config).read_text()) if args.config else {}
    fields.update(input=args.input, output=args.output, model=args.model, precision=args.precision)
    fields["inference_parameters"] = sampling_parameters(args)
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
        f"wall time: {summary.wall_seconds:.1f} s, {summary.output_tokens_per_second:.0f} output tokens/s, "
        f"{summary.input_tokens_per_second:.0f} input tokens/s\n"
        f"output: {summary.status.committed_bytes} bytes committed"
    )


def _run(args: argparse.Namespace) -> int:
    from raybatch.exceptions import ConfigError, IncompleteRunError, OutputConflictError
    from raybatch.runner import run_job

    try:
        config = _build_config(args)
    except (ValidationError, ValueError) as exc:
        print(f"raybatch run: invalid settings: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    bar = _ProgressBar()
    try:
        summary = run_job(config, on_progress=bar)
    except (ConfigError, OutputConflictError) as exc:
        print(f"raybatch run: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except IncompleteRunError as exc:
        print(f"raybatch run: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        bar.close()
    _print_summary(summary)
    if summary.state == "output_cap_reached":
        print(
            f"output_cap_reached: committed output stopped at the cap of {config.output_cap_bytes} "
            "bytes; the remaining lines were not processed",
            file=sys.stderr,
        )
        return ExitCode.OUTPUT_CAP
    return ExitCode.OK


def _tiny_model(args: argparse.Namespace) -> int:
    from raybatch.tiny_model import build_tiny_model

    print(build_tiny_model(args.path, seed=args.seed, shape=args.shape))
    return ExitCode.OK


def add_run_commands(sub) -> None:
    run = sub.add_parser("run", help="run one batch job on the Ray cluster in RAY_ADDRESS or a local one")
    run.add_argument("--input", required=True, help=".jsonl file or folder/prefix of shards (path, file://, s3://)")
    run.add_argument("--output", required=True, help="folder/prefix for results.jsonl and errors.jsonl")
    run.add_argument("--model", required=True, help="Hugging Face model ID or local path")
    add_sampling_flags(run)
    run.add_argument("--precision", default="PRECISION_UNSPECIFIED")
    run.add_argument("--output-cap-bytes", type=int, help="default 8 GiB")
    run.add_argument("--max-line-bytes", type=int, help="default 1 MiB")
    run.add_argument("--replicas", type=int, help="engine replicas (default: one per GPU group, or 1 on CPU)")
    run.add_argument("--tensor-parallel-size", type=int, default=1)
    run.add_argument("--max-model-len", type=int)
    run.add_argument("--config", help="JSON file of further RunConfig fields")
    run.set_defaults(handler=_run)
    tiny = sub.add_parser("tiny-model", help="write a tiny random Llama for tests and demos")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shape", choices=["tiny", "small", "bench"], default="tiny",
                      help="tiny: ~1M parameters (tests, demo); small: ~13M; bench: ~110M")
    tiny.set_defaults(handler=_tiny_model)
