"""CLI options come from the config dataclasses: every knob is offered, with the library's default, under its name."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from uflow_batch import cli
from uflow_batch.cli_options import config_from_options, config_options, option_fields
from uflow_batch.config import ScoreRequest, ScoringResources


def _options(command: click.Command) -> dict[str, click.Option]:
    return {param.name: param for param in command.params if isinstance(param, click.Option)}


def _config_fields(config: type) -> list[dataclasses.Field]:
    """Every field of a config, nested configs flattened (what a command could offer)."""
    hints = typing.get_type_hints(config)
    fields: list[dataclasses.Field] = []
    for f in dataclasses.fields(config):
        fields += _config_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else [f]
    return fields


def test_every_score_request_field_is_a_score_option_with_the_dataclass_default():
    options = _options(cli.score)
    offered = [f for f in _config_fields(ScoreRequest) if f.name not in cli.SCORE_FIELDS_WITHOUT_OPTION]
    assert {f.name for f in offered} >= {"inputs", "epsilon", "false_alarm_rate", "batch_size", "rows_per_file"}
    for f in offered:
        option = options[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        assert option.required == required, f.name
        assert option.default == (None if required else f.default), f"--{f.name}: the default is the dataclass's"
        assert option.help == f.metadata["help"], f.name


def test_the_fields_without_an_option_are_real_fields():
    names = {f.name for f in _config_fields(ScoreRequest)}
    assert set(cli.SCORE_FIELDS_WITHOUT_OPTION) <= names


def test_the_score_options_keep_their_names():
    names = sorted(opt for option in _options(cli.score).values() for opt in option.opts)
    assert names == sorted([
        "--input", "--models", "--output", "--run-date", "--categories", "--category-pattern", "--manifest",
        "--epsilon", "--false-alarm-rate", "--batch-size", "--actors", "--gpus-per-actor", "--cpus-per-actor",
        "--decode-cpus", "--runtime", "--rows-per-file", "--max-error-fraction", "--address", "--dry-run",
    ])
    assert _options(cli.score)["batch_size"].default == ScoringResources().batch_size == 16


def test_evaluate_and_report_offer_the_library_defaults():
    from uflow_batch.evaluate import evaluate_detector
    from uflow_batch.report import build_report

    assert _options(cli.evaluate)["batch_size"].default == inspect.signature(evaluate_detector).parameters["batch_size"].default == 8
    assert _options(cli.report)["top"].default == inspect.signature(build_report).parameters["top_n"].default == 24


def test_parsed_options_build_the_request_they_describe():
    built: list[ScoreRequest] = []

    @click.command()
    @config_options(ScoreRequest, skip=cli.SCORE_FIELDS_WITHOUT_OPTION)
    def probe(**options) -> None:
        built.append(config_from_options(ScoreRequest, options, run_date="2026-11-22"))
        assert not options, "every option is used"

    result = CliRunner().invoke(probe, ["--input", "a", "--input", "b/", "--models", "m", "--output", "o",
                                        "--categories", "x,y", "--batch-size", "4", "--gpus-per-actor", "0.5"])
    assert result.exit_code == 0, result.output
    assert built == [ScoreRequest(inputs=("a", "b"), models="m", output="o", run_date="2026-11-22", categories=("x", "y"),
                                  resources=ScoringResources(batch_size=4, gpus_per_actor=0.5))]


def test_a_field_without_help_text_cannot_become_an_option():
    @dataclass(frozen=True)
    class Undocumented:
        knob: int = 1

    with pytest.raises(TypeError, match="'knob' has no help text"):
        config_options(Undocumented)
    assert [f.name for f, _ in option_fields(ScoringResources)] == [f.name for f in dataclasses.fields(ScoringResources)]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "resources.batch_size must be an integer >= 1"),
    (["--epsilon", "0"], "epsilon must be a number > 0"),
    (["--runtime", "tensorrt"], "resources.runtime must be one of torch, onnx"),
    (["--max-error-fraction", "1.5"], "max_error_fraction must be a fraction of a run's rows in [0, 1]"),
])
def test_a_bad_value_is_one_line_and_exit_code_2(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "uflow_batch.cli", "score", "--input", str(tmp_path), "--models", "m",
                           "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
