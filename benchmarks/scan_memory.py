"""The driver's peak memory in the input scan, against input size.

Writes inputs of N chat lines (realistic custom_ids, one line in 1,000 repeating an
earlier id) and runs the runner's own `scan_input`, in-driver path (read, parse each
line, DuplicateScan; no Ray), in a fresh process per input, which reports its peak RSS
(ru_maxrss). The target (issue 11): the peak at 1M lines is at most 1.2x the one at
100k. `--old` also measures the scan with an unbounded budget (everything in memory,
as before the spill), for comparison.

    .venv/bin/python benchmarks/scan_memory.py [--lines 100000 1000000] [--old]
    .venv/bin/python benchmarks/scan_memory.py --smoke   # small inputs: does it work
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a careful assistant. Answer in plain prose, in one paragraph."


def write_input(path: Path, lines: int) -> None:
    rng = random.Random(lines)
    ids: list[str] = []
    with open(path, "w") as out:
        for n in range(lines):
            # A realistic id: run, index and a random tag; one line in 1,000 repeats one.
            custom_id = rng.choice(ids) if ids and n % 1000 == 999 else f"eval-run7-{n:09d}-{rng.getrandbits(32):08x}"
            if len(ids) < 1000:
                ids.append(custom_id)
            body = {"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": f"Question {n}: what is {rng.randrange(10**6)} squared?"}],
                    "max_tokens": 64}
            out.write(json.dumps({"custom_id": custom_id, "body": body}) + "\n")


def child(path: str, unbounded: bool) -> None:
    """Runs in a fresh process: the scan the driver runs, then its peak RSS."""
    import resource

    sys.path.insert(0, str(ROOT))  # this checkout's raybatch
    from raybatch.config import RunConfig
    from raybatch.pipeline.validate import DuplicateScan
    from raybatch.runner import scan_input
    from raybatch.storage import list_shards

    if unbounded:
        DuplicateScan.DEFAULT_MEMORY_ENTRIES = 1 << 62  # never spills: the old behaviour
    folder = str(Path(path).parent)
    config = RunConfig(input=folder, output=folder + "-out", model="m", in_driver_bytes=1 << 40)
    started = time.monotonic()
    scan = scan_input(list_shards(folder), config)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"lines": scan.lines, "duplicates": len(scan.duplicates),
                      "peak_rss_mib": peak_kib / 1024, "seconds": time.monotonic() - started}))


def measure(path: Path, unbounded: bool) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", str(path)] + (["--old"] if unbounded else []),
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small inputs (2k and 20k lines): checks that it works")
    parser.add_argument("--lines", type=int, nargs=2, help="the two input sizes (default 100000 1000000)")
    parser.add_argument("--old", action="store_true", help="also measure with an unbounded budget (no spill)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.old)
        return 0
    small, large = args.lines or ((2_000, 20_000) if args.smoke else (100_000, 1_000_000))
    results = {}
    with tempfile.TemporaryDirectory(prefix="raybatch-scan-bench-") as work:
        for lines in (small, large):
            path = Path(work) / f"in-{lines}" / "input.jsonl"
            path.parent.mkdir()
            write_input(path, lines)
            results[lines] = {"bounded": measure(path, False)}
            if args.old:
                results[lines]["unbounded"] = measure(path, True)
            path.unlink()
            for kind, r in results[lines].items():
                assert r["lines"] == lines and r["duplicates"] == lines // 1000, r
                print(f"{lines:>9,} lines, {kind:>9}: peak RSS {r['peak_rss_mib']:7.1f} MiB, scan {r['seconds']:6.1f} s",
                      flush=True)
    for kind in results[small]:
        ratio = results[large][kind]["peak_rss_mib"] / results[small][kind]["peak_rss_mib"]
        print(f"{kind}: peak RSS {large:,} / {small:,} lines = {ratio:.2f}x" + ("  (target <= 1.2x)" if kind == "bounded" else ""))
    ratio = results[large]["bounded"]["peak_rss_mib"] / results[small]["bounded"]["peak_rss_mib"]
    return 0 if args.smoke or ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
