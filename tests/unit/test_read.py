import io

from raybatch.pipeline.read import LineSet, iter_lines
from tests.helpers import peak_python_memory


def lines(data: bytes, limit: int = 64):
    return list(iter_lines(io.BytesIO(data), limit))


def test_crlf_bom_and_last_line_without_newline():
    assert lines(b"\xef\xbb\xbf{\"a\": 1}\r\n{}\r\nlast") == [(1, b'{"a": 1}'), (2, b"{}"), (3, b"last")]


def test_bom_only_stripped_on_the_first_line():
    assert lines(b"x\n\xef\xbb\xbfy\n") == [(1, b"x"), (2, b"\xef\xbb\xbfy")]


def test_blank_lines_keep_their_numbers():
    assert lines(b"a\n\n  \nb\n") == [(1, b"a"), (2, b""), (3, b"  "), (4, b"b")]


def test_long_line_is_skipped_in_bounded_reads():
    data = b"short\n" + b"x" * 100_000 + b"\nnext\n"
    assert lines(data, limit=10) == [(1, b"short"), (2, None), (3, b"next")]


def test_line_exactly_at_the_limit_is_kept():
    assert lines(b"x" * 10 + b"\r\n" + b"y" * 11 + b"\n", limit=10) == [(1, b"x" * 10), (2, None)]


def test_long_last_line_without_newline():
    assert lines(b"ok\n" + b"z" * 50, limit=10) == [(1, b"ok"), (2, None)]


def test_line_set():
    s = LineSet()
    for n in (1, 8, 9, 1000):
        s.add(n)
    assert [n in s for n in (0, 1, 2, 8, 9, 10, 1000, 5000)] == [False, True, False, True, True, False, True, False]
    assert len(s) == 4


class _EndlessLine(io.RawIOBase):
    """50 MB of one line, produced on the fly so the input itself takes no memory."""

    def __init__(self):
        self.left = 50 << 20

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        if self.left == 0 and n:
            buffer[n - 1 : n] = b"\n"
        return n


def _read_endless_line():
    return list(iter_lines(io.BufferedReader(_EndlessLine(), 1 << 20), 1 << 20))


def test_memory_stays_bounded_on_a_huge_line():
    peak, read = peak_python_memory(_read_endless_line)
    assert read == [(1, None)]
    assert peak < 8 << 20, peak
