"""The sampling flags (`--max-tokens`, `--temperature`, `--top-p`, `--top-k`, `--n`,
`--extra-body`), derived from `InferenceParameters` so that a field added to the wire
model becomes a flag of every command that takes them (`run`, `job create`,
`create batch-inference-job`) and is validated by the same rules as on the server."""

from __future__ import annotations

import argparse
import typing

from raybatch.protocol import InferenceParameters

_HELP = {
    "max_tokens": "maximum tokens to generate per response",
    "temperature": "sampling temperature",
    "top_p": "top-p (nucleus) sampling",
    "top_k": "top-k sampling",
    "n": "response candidates per input line",
    "extra_body": "JSON object of further body fields for every row, e.g. '{\"stop\": [\"\\n\"]}'",
}


def _flag_type(annotation) -> type:
    """Optional[int] -> int: the one non-None type argparse converts the value to."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 else annotation


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (job-wide defaults; a row's own value wins)")
    for name, field in InferenceParameters.model_fields.items():
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_flag_type(field.annotation),
            help=_HELP.get(name) or field.description,
        )


def sampling_parameters(args: argparse.Namespace) -> InferenceParameters:
    """The flags given, validated; raises pydantic's ValidationError (exit 2)."""
    given = {name: getattr(args, name, None) for name in InferenceParameters.model_fields}
    return InferenceParameters.model_validate({name: value for name, value in given.items() if value is not None})
