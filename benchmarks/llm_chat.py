"""The baseline: one `LLM.chat` call over every row of a requests file, with the given
engine arguments. Prints one line `BENCH_RESULT {json}`: start-up and generation
seconds, output tokens.

    python benchmarks/llm_chat.py MODEL REQUESTS.jsonl '{"max_num_seqs": 256, ...}'
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
    rows = [json.loads(line)["body"] for line in open(requests)]
    conversations = [row["messages"] for row in rows]
    params = [SamplingParams(max_tokens=row["max_tokens"], temperature=row.get("temperature", 1.0),
                             ignore_eos=row.get("ignore_eos", False)) for row in rows]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    done = time.monotonic()
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print("BENCH_RESULT " + json.dumps({"startup_s": ready - started, "generate_s": done - ready, "wall_s": done - started,
                      "output_tokens": tokens, "output_tokens_per_s": tokens / (done - ready)}), flush=True)


if __name__ == "__main__":
    main()
