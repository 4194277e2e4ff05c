"""A raw HTTP/1.1 client for fuzzing: sends exactly the bytes given, reads one answer, never normalises anything."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import orjson


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def exchange(port: int, raw: bytes, timeout_s: float = 20.0) -> Answer | None:
    """Sends raw, reads until the server closes (requests carry `Connection: close`); None when nothing came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return parse(bytes(received))


def parse(data: bytes) -> Answer | None:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return Answer(status, headers, bytes(body))
    return Answer(status, headers, rest)


def request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, *,
            content_length: bool = True) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def is_openai_error(body: bytes) -> bool:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and {"param", "code"} <= error.keys())


_DUMP = """
import sys
from gateway.inference import connect
client = connect("chdb://" + sys.argv[1])
sys.stdout.write(client.raw_query("SELECT * FROM lockgate.inference FINAL FORMAT JSONEachRow").decode())
client.close()
"""


def table_rows(folder: Path) -> list[str]:
    """Every row of a chdb folder's inference table as a JSON line, read in a process of its own (chdb opens one
    folder per process, for that process's life)."""
    out = subprocess.run([sys.executable, "-c", _DUMP, str(folder)], capture_output=True, check=True, timeout=120)
    # Split on newlines only: str.splitlines() also splits on the Unicode line separators a row's text may hold.
    return [line for line in out.stdout.decode().split("\n") if line]
