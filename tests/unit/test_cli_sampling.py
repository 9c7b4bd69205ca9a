"""The sampling flags come from `InferenceParameters`: every field is a flag of every
command that takes them, parsed to the field's type and validated by its rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raybatch.cli import app
from raybatch.cli.exit_codes import ExitCode
from raybatch.cli.run import _build_config
from raybatch.cli.sampling import sampling_parameters
from raybatch.protocol import InferenceParameters

COMMANDS = {
    "run": ["run", "--input", "in.jsonl", "--output", "out", "--model", "m"],
    "job create": ["job", "create"],
    "create batch-inference-job": ["create", "batch-inference-job"],
}
FLAGS = ["--max-tokens", "16", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "40", "--n", "2",
         "--extra-body", '{"seed": 7}']
PARAMETERS = InferenceParameters(max_tokens=16, temperature=0.5, top_p=0.9, top_k=40, n=2, extra_body='{"seed": 7}')


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_parses_the_flags_into_the_wire_model(command):
    args = app.build_parser().parse_args([*COMMANDS[command], *FLAGS])
    assert sampling_parameters(args) == PARAMETERS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag_and_no_flag_means_no_parameter(command):
    args = app.build_parser().parse_args(COMMANDS[command])
    assert all(hasattr(args, name) for name in InferenceParameters.model_fields)
    assert sampling_parameters(args).model_dump(exclude_none=True) == {}


def test_run_hands_the_parameters_to_its_config():
    args = app.build_parser().parse_args([*COMMANDS["run"], *FLAGS])
    assert _build_config(args).inference_parameters == PARAMETERS


def test_the_models_rules_apply():
    args = app.build_parser().parse_args([*COMMANDS["job create"], "--top-p", "1.5"])
    with pytest.raises(ValidationError, match="top_p"):
        sampling_parameters(args)


def test_a_value_of_the_wrong_type_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        app.build_parser().parse_args([*COMMANDS["job create"], "--max-tokens", "1.5"])
    assert exited.value.code == ExitCode.CONFIG  # argparse's usage error is 2 too
    assert "--max-tokens: invalid int value" in capsys.readouterr().err


def test_exit_codes_are_the_documented_numbers():
    assert [(code.name, int(code)) for code in ExitCode] == [
        ("OK", 0), ("FAILED", 1), ("CONFIG", 2), ("OUTPUT_CAP", 3), ("API", 4), ("TIMEOUT", 5),
    ]
