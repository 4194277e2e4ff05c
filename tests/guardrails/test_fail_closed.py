"""An analyzer that fails never lets text through: a real Presidio recognizer that raises is injected."""

import subprocess
import sys
from collections.abc import Iterator

import pytest
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from guardrails import GuardrailError, Guardrails, StreamScanner
from guardrails.engine import analyzer_for


class BrokenRecognizer(EntityRecognizer):
    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts) -> list[RecognizerResult]:
        raise RuntimeError("recognizer crashed")


@pytest.fixture
def broken_guard() -> Iterator[Guardrails]:
    # Its own phone regions give it its own analyzer, so the broken recognizer reaches no other test.
    guard = Guardrails(["EMAIL_ADDRESS", "PHONE_NUMBER"], phone_regions=("US", "CA"))
    registry = analyzer_for(guard.detector.key).registry
    registry.add_recognizer(BrokenRecognizer(supported_entities=["EMAIL_ADDRESS"], name="Broken"))
    yield guard
    registry.remove_recognizer("Broken")


async def test_request_scan_raises_instead_of_passing(broken_guard: Guardrails) -> None:
    body = {"messages": [{"role": "user", "content": "mail me at a.b@example.com"}]}
    for action in ("block", "mask", "flag"):
        with pytest.raises(GuardrailError, match="recognizer crashed"):
            await broken_guard.scan_request(body, "chat", action, "off")  # type: ignore[arg-type]


def test_stream_scan_raises_and_releases_nothing_unchecked(broken_guard: Guardrails) -> None:
    scanner = StreamScanner(broken_guard, "mask", "off")
    assert scanner.feed("Sure, here it is ") == "Sure, here it is "
    with pytest.raises(GuardrailError):
        scanner.feed("a.b@example.com and more")


def test_presidio_works_offline_without_downloading() -> None:
    script = (
        "import socket\n"
        "def refuse(*args, **kwargs): raise OSError('network disabled for this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from guardrails import Guardrails\n"
        "guard = Guardrails(['EMAIL_ADDRESS', 'IP_ADDRESS'])\n"
        "guard.warm_up()\n"
        "print(guard.scan_text('write to ops@example.co.uk', 'input', 'mask', 'off').body)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "write to <EMAIL_ADDRESS>"
