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


# ------------------------------------------------- claims read off unparsed lines


def _hostile_line(rng: random.Random, pool: list[str]) -> bytes:
    """A line of one of many shapes, valid or not, claiming an id of `pool` or not."""
    a, b = rng.choice(pool), rng.choice(pool)
    body = '{"messages": [{"role": "user", "content": "hi"}]}'
    shapes = [
        f'{{"custom_id": "{a}", "body": {body}}}',  # the usual: read unparsed
        f'  {{ "custom_id" :"{a}","body":{body}}}',  # spacing
        f'{{"body": {body}, "custom_id": "{a}"}}',  # not first: parsed
        f'{{"custom_id": "{a}", "body": {body}',  # unclosed: no JSON, no claim
        f'{{"custom_id": "{a}", "body": [1,]}}',  # no JSON
        f'{{"custom_id": "{a}", "body": ' + "[" * 70 + "]" * 70 + "}",  # too deep
        f'{{"custom_id": "{a}", "body": "\\ud800"}}',  # lone surrogate
        f'{{"custom_id": "{a}", "custom_id": "{b}", "body": {body}}}',  # the last key wins
        f'{{"custom_id": "{a}", "custom\\u005fid": "{b}"}}',  # so, escaped
        f'{{"custom_id": "{a}", "body": {{"custom_id": "{b}"}}}}',  # nested: not the line's
        f'{{"custom_id": "\\u00{ord(a[0]):02x}{a[1:]}", "body": {body}}}',  # escaped id: parsed
        '{"custom_id": "", "body": {}}',
        '{"custom_id": "' + "z" * 600 + '", "body": {}}',  # past the limit: no claim
        f'{{"custom_id": 7, "body": {body}}}',
        f'["custom_id", "{a}"]',
        "",
        "   ",
        f'{{"custom_id": "{a}", "body": {body}}} trailing',
    ]
    line = rng.choice(shapes).encode()
    return line if rng.random() > 0.03 else line.replace(b"hi", b"\xff")  # no UTF-8


def _reference_claims(raws: dict[tuple[str, int], bytes], names: list[str]) -> set:
    """Every line parsed, as the scan did before it read ids off unparsed lines."""
    from raybatch.pipeline.validate import custom_id_too_long, is_blank, parse_json_line, readable_custom_id
    from raybatch.exceptions import RowError

    seen, later = set(), set()
    for (shard, line) in sorted(raws, key=lambda key: (names.index(key[0]), key[1])):
        raw = raws[(shard, line)]
        if is_blank(raw):
            continue
        try:
            custom_id = readable_custom_id(parse_json_line(raw, 1 << 20))
        except RowError:
            continue
        if custom_id is None or custom_id_too_long(custom_id, 512):
            continue
        if custom_id in seen:
            later.add((shard, line))
        seen.add(custom_id)
    return later


@pytest.mark.parametrize("seed", range(6))
def test_ids_read_off_unparsed_lines_find_exactly_what_parsing_every_line_finds(tmp_path, seed):
    from raybatch.pipeline.validate import claims_among, scan_custom_ids

    rng = random.Random(seed)
    names = [f"part-{i}.jsonl" for i in range(3)]
    pool = [f"r{i}" for i in range(rng.choice((3, 20, 200)))]
    raws, tables = {}, []
    for name in names:
        lines = [_hostile_line(rng, pool) for _ in range(rng.randrange(1, 400))]
        for start in range(0, len(lines), 50):
            chunk = lines[start:start + 50]
            numbers = list(range(start + 1, start + 1 + len(chunk)))
            raws.update({(name, n): raw for n, raw in zip(numbers, chunk)})
            tables.append(pa.table({"shard": [name] * len(chunk), "line": numbers, "raw": chunk}))
    rng.shuffle(tables)
    asked = []

    def confirm(wanted):
        asked.append(len(wanted))
        return claims_among(tables, wanted, max_line_bytes=1 << 20)

    expected = _reference_claims(raws, names)
    for budget in (10**9, 7):
        scan = DuplicateScan(names, memory_entries=budget, spill_dir=tmp_path)
        for table in tables:
            scan.add(scan_custom_ids(table, max_line_bytes=1 << 20))
        assert scan.duplicates(confirm) == expected
    assert expected and asked  # the corpus has duplicates, and some needed asking


def test_an_input_without_repeated_ids_parses_no_line_in_the_scan(monkeypatch):
    from raybatch.pipeline import validate

    lines = [json.dumps({"custom_id": f"r{i}", "body": {"messages": []}}).encode() for i in range(100)]
    parsed = []
    monkeypatch.setattr(validate, "parse_json_line", lambda *a: parsed.append(1))
    scan = DuplicateScan(["in.jsonl"])
    scan.add(validate.scan_custom_ids(pa.table({"shard": ["in.jsonl"] * 100, "line": list(range(1, 101)), "raw": lines}),
                                      max_line_bytes=1 << 20))
    assert scan.duplicates(lambda wanted: pytest.fail("nothing to ask")) == set() and parsed == []


def test_scan_input_parses_again_only_what_decides_a_duplicate(tmp_path):
    """The runner's scan: a broken line that starts with an id claims nothing, so the
    valid line after it is the first "x"; the later shard's "x" is the duplicate."""
    from raybatch.config import RunConfig
    from raybatch.runner import scan_input

    data = tmp_path / "in"
    data.mkdir()
    valid = json.dumps({"custom_id": "x", "body": {"messages": []}})
    (data / "a.jsonl").write_text('{"custom_id": "x", "body": \n' + valid + "\n" + valid.replace('"x"', '"y"') + "\n")
    (data / "b.jsonl").write_text(valid + "\n")
    config = RunConfig(input=str(data), output=str(tmp_path / "out"), model="m")
    scan = scan_input(list_shards(str(data)), config)
    assert (scan.lines, scan.duplicates) == (4, {("b.jsonl", 1)})
