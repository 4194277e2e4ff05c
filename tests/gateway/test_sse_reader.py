"""The upstream event-stream reader: any split of the bytes gives the same events; sizes and encodings are bounded."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.providers.sse import EventReader, InvalidEvent


class Pieces:
    """A byte source handing over the given pieces one read at a time, as a socket might."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.read = 0

    async def readany(self) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        self.read += len(piece)
        return piece


async def _events(source: Pieces, max_event_bytes: int = 1 << 20) -> list[tuple[str, bytes]]:
    return [item async for item in EventReader(source, max_event_bytes)]


def _split(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(wire) + 1) for cut in cuts} | {0, len(wire)})
    return [wire[a:b] for a, b in itertools.pairwise(points) if b > a]


_names = st.sampled_from(["", "message_start", "content_block_delta", "ping"])
_data = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip() or b"{}")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_names, _data), min_size=1, max_size=8), st.sampled_from([b"\n", b"\r\n"]),
       st.lists(st.integers(min_value=0), max_size=12))
async def test_any_split_of_the_stream_gives_the_same_events(events: list[tuple[str, bytes]], newline: bytes,
                                                             cuts: list[int]) -> None:
    wire = b"".join((b"event: %s%s" % (name.encode(), newline) if name else b"") + b"data: " + data + newline * 2
                    for name, data in events)
    assert await _events(Pieces(_split(wire, cuts))) == [(name, data) for name, data in events]


async def test_an_event_over_the_limit_fails_whether_it_comes_whole_or_in_pieces() -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    with pytest.raises(InvalidEvent, match="larger than the limit"):
        await _events(Pieces([b"data: {}\n\n" + big]), max_event_bytes=4096)
    with pytest.raises(InvalidEvent, match="larger than the limit"):
        await _events(Pieces([big[i:i + 100] for i in range(0, len(big), 100)]), max_event_bytes=4096)
    assert await _events(Pieces([big]), max_event_bytes=8192) == [("", b"x" * 5000)]


async def test_an_event_that_never_ends_is_cut_at_the_limit() -> None:
    source = Pieces([b"data: {\"a\":\""] + [b"y" * 1000] * 10_000)
    with pytest.raises(InvalidEvent):
        await _events(source, max_event_bytes=64 * 1024)
    assert source.read < 70 * 1024, "the reader stopped reading soon after the limit"


async def test_an_event_name_that_is_not_utf8_is_an_invalid_event() -> None:
    with pytest.raises(InvalidEvent, match="UTF-8"):
        await _events(Pieces([b"event: \xff\xfe\ndata: {}\n\n"]))


async def test_the_last_event_counts_without_its_blank_line() -> None:
    assert await _events(Pieces([b"data: 1\n\n", b"data: 2\r\n"])) == [("", b"1"), ("", b"2")]
