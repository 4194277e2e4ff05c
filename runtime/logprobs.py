"""vLLM's per-token logprobs as OpenAI writes them: chat's `logprobs.content[]` and the legacy completions object."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# OpenAI's stand-in for minus infinity, which JSON cannot carry.
_FLOOR = -9999.0


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells every byte as one printable character; this maps the characters back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_alphabet()


class Logprobs:
    """Formats one engine's logprobs; built once per engine, when it starts, from the tokenizer's vocabulary."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # Skipped in the answer's text, so also in its logprobs: their tokens then spell exactly the text.
        self._special = frozenset(tokenizer.all_special_ids)
        self._bytes = self._vocabulary_bytes(tokenizer)

    def chat(self, token_ids: Sequence[int], steps: Sequence[Mapping[int, Any] | None], top: int) -> list[dict]:
        """Entries of chat's `choices[].logprobs.content`, one per token the text holds."""
        content = []
        for token_id, step in zip(token_ids, steps, strict=False):
            if token_id in self._special:
                continue
            chosen = step.get(token_id) if step else None
            token = self._token(token_id, chosen)
            content.append({
                "token": token,
                "logprob": _logprob(chosen),
                "bytes": self.token_bytes(token_id, token),
                "top_logprobs": [
                    {"token": (text := self._token(alt_id, alt)), "logprob": _logprob(alt),
                     "bytes": self.token_bytes(alt_id, text)}
                    for alt_id, alt in _most_likely(step, top)
                ],
            })
        return content

    def legacy(self, token_ids: Sequence[int], steps: Sequence[Mapping[int, Any] | None], top: int,
               offset: int) -> dict[str, list]:
        """The completions `logprobs` object; `offset` is where the first token starts in the answer's text."""
        tokens: list[str] = []
        chosen_logprobs: list[float] = []
        alternatives: list[dict[str, float]] = []
        offsets: list[int] = []
        for token_id, step in zip(token_ids, steps, strict=False):
            if token_id in self._special:
                continue
            chosen = step.get(token_id) if step else None
            token = self._token(token_id, chosen)
            tokens.append(token)
            chosen_logprobs.append(_logprob(chosen))
            # As OpenAI documents it: the top `logprobs` tokens, plus the chosen one when it is not among them.
            alternatives.append({**{self._token(alt_id, alt): _logprob(alt) for alt_id, alt in _most_likely(step, top)},
                                 token: _logprob(chosen)})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": chosen_logprobs, "top_logprobs": alternatives,
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if isinstance(decoded, str) else self._tokenizer.decode([token_id])

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """The token's own bytes: for byte-level BPE these can be part of a character, which its text cannot show."""
        known = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else None
        return list(known if known is not None else text.encode("utf-8", errors="replace"))

    def _vocabulary_bytes(self, tokenizer: Any) -> list[bytes | None]:
        """Each token's bytes where the tokenizer spells them byte by byte (GPT-2's byte-level BPE); read once, so
        answering touches the tokenizer no more (it is not safe to share across threads)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
            return []
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return [bytes(_BYTE_LEVEL[char] for char in piece)
                if isinstance(piece, str) and token_id not in self._special and all(char in _BYTE_LEVEL for char in piece)
                else None
                for token_id, piece in enumerate(pieces)]


def _most_likely(step: Mapping[int, Any] | None, top: int) -> list[tuple[int, Any]]:
    """vLLM lists the chosen token first, then the most likely by rank; OpenAI wants only the most likely."""
    if not step or not top:
        return []
    ranked = [(token_id, logprob) for token_id, logprob in step.items() if (logprob.rank or top + 1) <= top]
    return sorted(ranked, key=lambda item: item[1].rank)


def _logprob(logprob: Any) -> float:
    return max(logprob.logprob, _FLOOR) if logprob is not None else _FLOOR
