"""DuplicateScan's bounded memory: past its budget it spills claims to bucket files and
sorts one bucket at a time. The spilled path must give exactly the in-memory answer,
and leave no file behind, whatever happens."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from raybatch.exceptions import InputTooLarge
from raybatch.storage import list_shards
from raybatch.pipeline.rows import SCAN_SCHEMA
from raybatch.pipeline.validate import DuplicateScan, custom_id_digest


def _random_input(seed: int) -> tuple[list[str], list[pa.Table]]:
    """Scan batches of 5 shards, ids drawn from a small pool (many duplicates, within
    and across shards and buckets), some blank lines and some lines that claim nothing;
    the batches come in random order, as Ray Data may deliver them."""
    rng = random.Random(seed)
    names = [f"part-{i}.jsonl" for i in range(5)]
    pool = [f"req-{rng.randrange(10**9)}" for _ in range(rng.choice((30, 400, 3000)))]
    batches = []
    for name in names:
        lines = rng.randrange(1, 800)
        for start in range(1, lines + 1, 97):
            rows = []
            for line in range(start, min(start + 97, lines + 1)):
                kind = rng.random()
                digest = None if kind < 0.05 else custom_id_digest(rng.choice(pool))
                rows.append({"shard": name, "line": line, "custom_id_digest": digest, "blank": 0.05 <= kind < 0.08})
                if rows[-1]["blank"]:
                    rows[-1]["custom_id_digest"] = None
            batches.append(pa.Table.from_pylist(rows, schema=SCAN_SCHEMA))
    rng.shuffle(batches)
    return names, batches


def _expected(names: list[str], batches: list[pa.Table]) -> set:
    """Brute force: walk the claims in shard-then-line order; all but the first are later."""
    claims = sorted(
        (names.index(r["shard"]), r["line"], r["custom_id_digest"])
        for b in batches for r in b.to_pylist() if r["custom_id_digest"] is not None
    )
    seen, later = set(), set()
    for shard, line, digest in claims:
        if digest in seen:
            later.add((names[shard], line))
        seen.add(digest)
    return later


@pytest.mark.parametrize("seed", range(4))
def test_the_spilled_scan_finds_exactly_what_the_in_memory_scan_finds(tmp_path, seed):
    names, batches = _random_input(seed)
    answers = []
    for budget in (10**9, 4, 300):  # in memory; buckets split again (down to the last byte); spilled
        spill = tmp_path / f"budget-{budget}"
        spill.mkdir()
        scan = DuplicateScan(names, memory_entries=budget, spill_dir=spill)
        spilled = False
        for batch in batches:
            scan.add(batch)
            spilled = spilled or any(spill.iterdir())
        assert spilled == (budget < 10**9)
        answers.append((scan.lines, scan.blank_lines, scan.duplicates()))
        assert list(spill.iterdir()) == []  # the temporary folder is gone
    assert answers[0][2] == _expected(names, batches) and answers[0][2]
    assert all(answer == answers[0] for answer in answers[1:])


def test_an_error_while_adding_leaves_no_spill_behind(tmp_path):
    names, batches = _random_input(7)
    with pytest.raises(RuntimeError):
        with DuplicateScan(names, memory_entries=10, spill_dir=tmp_path) as scan:
            for batch in batches[:5]:
                scan.add(batch)
            assert any(tmp_path.iterdir())
            raise RuntimeError("the reader failed")
    assert list(tmp_path.iterdir()) == []


def test_an_error_while_sorting_the_buckets_leaves_no_spill_behind(tmp_path, monkeypatch):
    names, batches = _random_input(8)
    scan = DuplicateScan(names, memory_entries=10, spill_dir=tmp_path)
    for batch in batches:
        scan.add(batch)
    calls = []
    real = DuplicateScan._later_claims

    def failing(self, entries):
        calls.append(1)
        if len(calls) == 3:  # some buckets done, some files still there
            raise OSError("disk gone")
        return real(self, entries)

    monkeypatch.setattr(DuplicateScan, "_later_claims", failing)
    with pytest.raises(OSError):
        scan.duplicates()
    assert list(tmp_path.iterdir()) == []


def test_scan_input_removes_the_spill_when_the_input_is_too_large(tmp_path, monkeypatch):
    """The runner's in-driver scan: a shard past max_shard_bytes stops it mid-way, after
    it has spilled; the spill folder goes with it."""
    from raybatch.config import RunConfig
    from raybatch.runner import scan_input

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(DuplicateScan, "DEFAULT_MEMORY_ENTRIES", 100)
    monkeypatch.setattr("tempfile.tempdir", str(spill))
    data = tmp_path / "in"
    data.mkdir()
    line = json.dumps({"custom_id": "x", "body": {"messages": []}}) + "\n"
    (data / "a.jsonl").write_text("".join(line.replace('"x"', f'"{i % 500}"') for i in range(3000)))
    config = RunConfig(input=str(data), output=str(tmp_path / "out"), model="m")
    shards = list_shards(str(data))
    assert scan_input(shards, config).duplicates == {("a.jsonl", n) for n in range(501, 3001)}
    assert list(spill.iterdir()) == []
    limited = config.model_copy(update={"max_shard_bytes": 1500 * len(line)})  # past the first spills
    with pytest.raises(InputTooLarge):
        scan_input(shards, limited)
    assert list(spill.iterdir()) == []
