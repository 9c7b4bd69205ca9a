"""raybatch: self-hosted, Fireworks-compatible batch LLM inference on Ray Data and vLLM."""

from raybatch.config import EngineConfig, RunConfig
from raybatch.protocol import BatchOutputLine, InferenceParameters, JobProgress, Precision

__all__ = [
    "BatchOutputLine",
    "EngineConfig",
    "InferenceParameters",
    "JobProgress",
    "Precision",
    "RunConfig",
    "run_job",
]


def run_job(config, on_progress=None):
    """Run one batch job; see `raybatch.runner.run_job`. Imported lazily: it pulls in Ray."""
    from raybatch.runner import run_job as _run_job

    return _run_job(config, on_progress)
