"""tiktoken encodings built from a parsed copy of their ranks, so a start does not parse the vocabulary again.

tiktoken reads a vocabulary as ~200,000 base64 lines and decodes them one by one in Python (0.25-0.55 s for
`o200k_base` on a loaded 2-core machine); `marshal` reads the same dict back in ~0.08 s. The copy sits beside
tiktoken's own cache as `<encoding>.ranks`, made on first use from tiktoken's own constructor (which checks the
vocabulary's SHA-256). Its header names the tiktoken and marshal versions it was made with and the SHA-256 of what
follows: a copy from another version, truncated, or altered in any byte is ignored and made again, so a count never
rests on a damaged vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken_ext.openai_public

log = logging.getLogger("lockgate.tokens")

FORMAT = b"lockgate-ranks/1"
SUFFIX = ".ranks"
# The largest copy read back: o200k_base's is 3.4 MB; anything far beyond that is not one of ours.
MAX_BYTES = 64 * 1024 * 1024


def _header(digest: str) -> bytes:
    return b" ".join((FORMAT, tiktoken.__version__.encode(), str(marshal.version).encode(), digest.encode())) + b"\n"


def cache_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{SUFFIX}"


def read_spec(path: Path) -> dict[str, Any] | None:
    """The constructor arguments kept in `path`, or None when there is no usable copy."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError:
        return None
    header, newline, payload = data.partition(b"\n")
    if not newline or len(data) > MAX_BYTES:
        return None
    if header + b"\n" != _header(hashlib.sha256(payload).hexdigest()):
        return None
    try:
        spec = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("mergeable_ranks"), dict):
        return None
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    """Written whole under a temporary name, then renamed: workers starting together never read half a copy."""
    payload = marshal.dumps(spec)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_bytes(_header(hashlib.sha256(payload).hexdigest()) + payload)
        partial.replace(path)
    except OSError as exc:
        # A read-only cache folder costs the next start the slow parse, nothing else.
        log.warning("could not keep the parsed %s vocabulary in %s: %s", spec.get("name"), path.parent, exc)
        partial.unlink(missing_ok=True)


def build_encoding(folder: Path, name: str) -> tiktoken.Encoding:
    """The encoding `name` of tiktoken's OpenAI set, from the parsed copy in `folder` when it holds a usable one."""
    path = cache_path(folder, name)
    spec = read_spec(path)
    if spec is not None and spec.get("name") == name:
        try:
            return tiktoken.Encoding(**spec)
        except Exception:
            # Whole and of this version, yet not an encoding tiktoken accepts: made again like a damaged one.
            log.warning("the parsed %s vocabulary in %s is unusable: made again", name, folder)
    spec = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]()
    write_spec(path, spec)
    return tiktoken.Encoding(**spec)
