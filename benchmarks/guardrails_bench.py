"""Added latency of the guardrails on ~200-word chat messages, and stream-scanner cost per delta.

Run: .venv/bin/python benchmarks/guardrails_bench.py [--ner]
Target: a clean message adds p50 < 300 µs (the prefilter proves it clean; Presidio does not run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from guardrails import Guardrails, StreamScanner

ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"]
CLEAN = (
    "I am preparing a presentation for our quarterly planning meeting and I would like your help with the "
    "structure. The audience is the leadership team, so the tone should be concise and focused on outcomes "
    "rather than process. We want to cover what went well in the last quarter, where we fell short, and "
    "what we plan to change. In particular, the onboarding flow for new customers took longer than we hoped, "
    "and the support team reported that many questions were about the same few settings. I think we should "
    "propose a short guided tour inside the product, a revised help page, and a weekly review of the most "
    "common questions. Could you suggest an outline with five or six slides, a title for each, and two or "
    "three bullet points per slide? Please also recommend how to open the talk so that people pay attention "
    "from the start, and how to close it with a clear request for a decision. Keep the language plain and "
    "avoid jargon, because several people in the room are new to the team and may not know our internal "
    "terms. If you think a different structure would work better, explain why in a few sentences before "
    "the outline. Thank you for the help, this is due at the end of the week."
)
PII = CLEAN.replace("Thank you for the help", "Mail me at dana.lee@example.com or call +1-415-555-0132, thanks")
CHUNK = 4  # characters per streamed delta, about one token


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.99) - 1] * 1e6


async def _time_async(fn: Callable[[], Awaitable[object]], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def _time_stream(guard: Guardrails, text: str, pii: str, runs: int) -> tuple[float, float]:
    samples = []
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
    for _ in range(runs):
        scanner = StreamScanner(guard, pii, "off")  # type: ignore[arg-type]
        for chunk in chunks:
            start = time.perf_counter()
            scanner.feed(chunk)
            samples.append(time.perf_counter() - start)
        scanner.finish()
    return _percentiles(samples)


async def main(ner: bool, runs: int) -> None:
    started = time.perf_counter()
    guard = Guardrails(ENTITIES + (["PERSON"] if ner else []), 0.5, [("codename", r"\bBLUEBIRD-\d+\b")], ner=ner)
    built = time.perf_counter() - started
    started = time.perf_counter()
    guard.warm_up()
    warmed = time.perf_counter() - started
    print(f"mode: {'NER (spaCy)' if ner else 'patterns'}; build {built:.2f} s (Presidio import), warm-up {warmed:.2f} s")
    print(f"messages: {len(CLEAN.split())} words; stream deltas of {CHUNK} characters")
    for label, text, pii in (("clean", CLEAN, "mask"), ("pii", PII, "mask"), ("pii", PII, "block")):
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        p50, p99 = await _time_async(lambda body=body, pii=pii: guard.scan_request(body, "chat", pii, "block"), runs)
        print(f"scan_request  {label:5} {pii:5}  p50 {p50:9.1f} µs  p99 {p99:9.1f} µs")
    for label, text in (("clean", CLEAN), ("pii", PII)):
        p50, p99 = _time_stream(guard, text, "mask", max(5, runs // 50))
        print(f"stream delta  {label:5} mask   p50 {p50:9.1f} µs  p99 {p99:9.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ner", action="store_true", help="measure the spaCy NER mode instead")
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.ner, args.runs))
