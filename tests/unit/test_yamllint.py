"""yamllint, with the repository's .yamllint, over every YAML file users apply or edit:
the chart's values.yaml and Chart.yaml, the chart's renderings (its templates are Go
templates, not YAML), cluster/*.yaml and raybatch/deploy/serve.yaml. Warnings fail too."""

from __future__ import annotations

from pathlib import Path

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.unit.helm_render import CHART, Renderer
from tests.unit.test_helm_chart import VALUE_CASES

ROOT = Path(__file__).resolve().parents[2]
CONFIG = YamlLintConfig(file=str(ROOT / ".yamllint"))
FILES = sorted([CHART / "values.yaml", CHART / "Chart.yaml", *(ROOT / "cluster").glob("*.yaml"),
                ROOT / "raybatch" / "deploy" / "serve.yaml"])


def lint(text: str, path: str) -> list[str]:
    return [f"{path}:{p.line}:{p.column}: {p.desc} ({p.rule})" for p in linter.run(text, CONFIG, path)]


def test_the_files_are_the_ones_meant():
    names = {str(path.relative_to(ROOT)) for path in FILES}
    assert {"cluster/rayservice.yaml", "cluster/rayjob.yaml", "cluster/aws.yaml", "cluster/gcp.yaml"} <= names
    # A file the config ignores would pass unlinted.
    assert not [name for name in names if CONFIG.is_file_ignored(name)]


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_yaml_files_pass_yamllint(path):
    name = str(path.relative_to(ROOT))
    assert lint(path.read_text(), name) == []


@pytest.mark.parametrize("case", VALUE_CASES)
def test_chart_renderings_pass_yamllint(case):
    values = VALUE_CASES[case]()
    renderings = {name: text for name, text in Renderer(values=values).render_all().items() if text.strip()}
    assert renderings
    problems = [problem for name, text in renderings.items()
                for problem in lint(text, f"helm/raybatch/rendered-{case}/{name}")]
    assert problems == []
