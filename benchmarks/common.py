"""What the benchmarks share: the model, the prompts, the engine arguments, the
`LLM.chat` baseline (in a process of its own) and a service started for the run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SYSTEM_PROMPT = ("You are a careful assistant. Answer in plain prose, in one paragraph, "
                 "and never use lists. Keep to the facts you are given. ") * 2  # ~60 tokens, shared


def build_model(shape: str) -> str:
    """The random model of this shape, built once into .cache/bench-<shape>."""
    path = ROOT / ".cache" / f"bench-{shape}"
    if not (path / "config.json").exists():
        from raybatch.tiny_model import build_tiny_model

        build_tiny_model(path, seed=0, shape=shape)
    return str(path)


def engine_extra(shape: str) -> dict:
    """vLLM arguments beyond the planner's, for the service's catalog and the baseline
    alike. On a CPU without bf16 instructions (AVX2 only, as here) bfloat16 is emulated
    and float32 is several times faster; torch.compile takes many minutes on two cores,
    so the engine runs eager."""
    import torch

    extra = {"enforce_eager": True}
    if not torch.cuda.is_available():
        extra["dtype"] = "float32"
    return extra


def engine_args(shape: str, extra: dict | None = None) -> dict:
    """The vLLM arguments the service's planner gives the model (with `extra`, default
    `engine_extra(shape)`), so that the baseline gets the very same."""
    from raybatch.config import EngineConfig
    from raybatch.precision import NodeResources, plan_engines
    from raybatch.protocol import Precision

    config = EngineConfig(max_model_len=1024, engine_args=engine_extra(shape) if extra is None else extra)
    return plan_engines(config, Precision.PRECISION_UNSPECIFIED, [NodeResources()]).engine_args


def write_requests(path: Path, rows: int, max_tokens: int) -> Path:
    """Chat rows with a shared system prompt; `ignore_eos` so every row yields exactly
    `max_tokens` tokens (a random model would otherwise stop anywhere)."""
    with open(path, "w") as out:
        for i in range(rows):
            body = {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": f"Tell me about item number {i}."}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            out.write(json.dumps({"custom_id": f"row-{i}", "body": body}) + "\n")
    return path


def llm_chat_baseline(model: str, requests: Path, arguments: dict, then: Path | None = None) -> dict:
    """One `LLM.chat` call over the same rows, in a fresh process (`llm_chat.py`); with
    `then`, a second call over those rows on the same engine (under "then")."""
    command = [PYTHON, str(ROOT / "benchmarks" / "llm_chat.py"), model, str(requests), json.dumps(arguments)]
    done = subprocess.run(command + ([str(then)] if then else []), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"LLM.chat baseline failed:\n{done.stderr[-3000:]}")
    # vLLM logs to stdout too, also after the result line.
    [result] = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    return json.loads(result.split(" ", 1)[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(work: Path, catalog: dict, accounts: tuple[str, ...], settings: dict | None = None) -> Iterator[dict]:
    """`raybatch up` with this model catalog (name → entry) and any other service
    settings; a client per account."""
    from raybatch.client import RaybatchClient

    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    config = {"storage": str(work / "storage"), "progress_interval_seconds": 0.5, "models": catalog, **(settings or {})}
    (home / "service.json").write_text(json.dumps(config))
    env = {**os.environ, "RAYBATCH_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    rb = [PYTHON, "-m", "raybatch.cli"]
    up = subprocess.run([*rb, "up", "--port", str(_free_port()), "--config", str(home / "service.json")],
                        env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        raise RuntimeError(f"raybatch up failed:\n{up.stderr[-3000:]}")
    base_url = up.stdout.strip().splitlines()[-1]
    try:
        clients = {}
        for account in accounts:
            key = subprocess.run([*rb, "keys", "--storage", config["storage"], "create", "--account", account],
                                 env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            clients[account] = RaybatchClient(base_url=base_url, api_key=key, account=account, timeout=120)
        yield clients
    finally:
        subprocess.run([*rb, "down"], env=env, capture_output=True, text=True, timeout=300)
