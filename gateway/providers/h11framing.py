"""The HTTP/1.1 response framing rules the providers' client enforces (RFC 9112), apart from its I/O.

Pure functions over bytes already received: a status line and headers, how the body ends, a chunk-size line.
Anything outside the grammar or over a limit is a ProtocolError, never a guess: a proxy that reads a response
differently from the upstream that wrote it is open to response splitting.
"""

from __future__ import annotations

import re

HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, UNTIL_EOF, DONE = range(8)
MAX_HEADERS = 128
# RFC 9112 7.1: chunk-size [ chunk-ext ]; sixteen digits already exceed any limit, so more are never needed.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*;[^\r\n]*")
_BLANKS = (b" ", b"\t")


class ProtocolError(Exception):
    """The upstream's bytes are not an HTTP/1.1 response."""


def chunk_size(line: bytes) -> int:
    """A size line with an extension, or one outside the grammar: the parser's fast path takes the plain ones."""
    match = _CHUNK_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"invalid chunk size line {line[:40]!r}")
    return int(match.group(1), 16)


def parse_head(head: bytes) -> tuple[bytes, int, dict[str, str]]:
    """(version, status, headers) of a head without its final blank line; repeated headers joined by commas."""
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADERS + 1:
        raise ProtocolError(f"more than {MAX_HEADERS} response headers")
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise ProtocolError("a bare CR or LF in the response head")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3 or rest[3:4] not in (b"", b" "):
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:40]!r}")
    status = int(code)
    if status == 101:
        raise ProtocolError("the upstream switched protocols, which was not asked for")
    headers: dict[str, str] = {}
    if status < 200:
        return version, status, headers
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in _BLANKS or name[:1] in _BLANKS:
            raise ProtocolError(f"invalid header line {line[:40]!r}")
        key = name.lower().decode("latin-1")
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return version, status, headers


def body_framing(version: bytes, status: int, headers: dict[str, str], limit: int) -> tuple[int, int, bool]:
    """(parser state, bytes to read, keep-alive): how the body ends and whether the connection outlives it (6.3, 9.6)."""
    connection = headers.get("connection")
    keep_alive = version == b"HTTP/1.1" and (connection is None or connection == "keep-alive" or "close" not in {
        token.strip(" \t").lower() for token in connection.split(",")})
    coding = headers.get("content-encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise ProtocolError(f"a Content-Encoding that was not asked for: {coding[:40]!r}")
    codings = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if codings is not None:
        if length is not None:
            raise ProtocolError("both Transfer-Encoding and Content-Length")
        if codings != "chunked" and [c for c in (c.strip(" \t") for c in codings.lower().split(",")) if c] != ["chunked"]:
            raise ProtocolError(f"a Transfer-Encoding that was not asked for: {codings[:40]!r}")
        return CHUNK_SIZE, 0, keep_alive
    if length is not None:
        remaining = content_length(length, limit)
        return (LENGTH if remaining else DONE), remaining, keep_alive
    if status in (204, 304):
        return DONE, 0, keep_alive
    return UNTIL_EOF, 0, False


def content_length(value: str, limit: int) -> int:
    text = value
    if not (text.isdigit() and text.isascii()):
        # Repeated headers were joined with commas; equal repeats are allowed (RFC 9110 8.6).
        values = {part.strip(" \t") for part in value.split(",")}
        if len(values) != 1:
            raise ProtocolError("conflicting Content-Length values")
        text = values.pop()
        if not (text.isdigit() and text.isascii()):
            raise ProtocolError(f"invalid Content-Length {text[:40]!r}")
    if len(text) > 19:
        raise ProtocolError(f"invalid Content-Length {text[:40]!r}")
    length = int(text)
    if length > limit:
        raise ProtocolError(f"a Content-Length of {length} is larger than the limit of {limit} bytes")
    return length
