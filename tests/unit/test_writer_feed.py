"""The driver's side of the writer (`WriterFeed`): batches grouped into appends, a
bounded number of appends unanswered, every row handed over exactly once, in order."""

from raybatch.output_layout import load_commits
from raybatch.pipeline.write import OutputWriter, WriterFeed
from raybatch.storage import Location
from tests.helpers import batch


class Deferred:
    """A writer whose appends are answered only when waited for, like a Ray call."""

    def __init__(self, writer):
        self.writer, self.sent, self.answered = writer, [], 0

    def send(self, table):
        self.sent.append(table)
        return len(self.sent) - 1

    def wait(self, handle):
        assert handle == self.answered, "answers are taken in the order appends were sent"
        self.answered += 1
        return self.writer.append(self.sent[handle])


def test_fast_batches_are_grouped_and_at_most_in_flight_appends_wait(tmp_path):
    writer = OutputWriter(str(tmp_path), cap_bytes=10**9, part_max_rows=1000, part_max_bytes=10**9,
                          part_max_seconds=3600, total_input_requests=100)
    deferred = Deferred(writer)
    feed = WriterFeed(deferred.send, deferred.wait, append_rows=20, append_seconds=3600, in_flight=2)
    for start in range(1, 101, 5):  # 20 batches of 5 rows
        feed.add(batch(range(start, start + 5)))
        assert len(deferred.sent) - deferred.answered <= 2  # the bound
    # The first batch alone (the first commit comes with the first answers), then 20 rows each.
    assert [t.num_rows for t in deferred.sent] == [5, 20, 20, 20, 20]
    status = feed.drain()
    assert [t.num_rows for t in deferred.sent] == [5, 20, 20, 20, 20, 15]
    assert deferred.answered == len(deferred.sent)
    assert status.progress.total_processed_requests == 5  # committed: the first part; the rest is in the writer's buffer
    assert writer.flush().progress.total_processed_requests == 100
    lines = [line for c in load_commits(Location(str(tmp_path))) for first, last in c.lines["in.jsonl"]
             for line in range(first, last + 1)]
    assert sorted(lines) == list(range(1, 101)) and len(lines) == 100


def test_a_slow_stream_sends_every_batch_at_once(tmp_path):
    """Batches further apart than append_seconds are not held: no commit waits for the next batch."""
    sent = []
    feed = WriterFeed(lambda t: sent.append(t) or t, lambda t: None, append_rows=1000, append_seconds=0)
    for start in (1, 3, 5):
        feed.add(batch([start, start + 1]))
    assert [t.num_rows for t in sent] == [2, 2, 2]
