import pytest

from guardrails import Guardrails, Unscannable, words_to_regex

CARD = "4111 1111 1111 1111"
EMAIL = "maria.gonzalez@acme-corp.com"


def _chat(*contents: object) -> dict:
    return {"model": "chat-default", "messages": [{"role": "user", "content": c} for c in contents]}


async def test_block_names_entity_types_never_values(guard: Guardrails) -> None:
    verdict = await guard.scan_request(_chat(f"my card is {CARD}, mail {EMAIL}"), "chat", "block", "off")
    assert verdict.blocked
    assert "CREDIT_CARD" in verdict.message and "EMAIL_ADDRESS" in verdict.message
    assert CARD not in verdict.message and EMAIL not in verdict.message
    records = [f.as_dict() for f in verdict.findings]
    assert {r["entity_type"] for r in records} == {"CREDIT_CARD", "EMAIL_ADDRESS"}
    assert all(r["direction"] == "input" and r["action"] == "block" and r["count"] == 1 for r in records)
    assert CARD not in repr(records) and EMAIL not in repr(records)


async def test_mask_rewrites_strings_and_text_parts_and_leaves_the_original(guard: Guardrails) -> None:
    body = _chat(
        f"write to {EMAIL}",
        [{"type": "text", "text": f"card {CARD}"}, {"type": "image_url", "image_url": {"url": "http://x/1.png"}}],
        "nothing to see",
    )
    verdict = await guard.scan_request(body, "chat", "mask", "off")
    assert not verdict.blocked
    messages = verdict.body["messages"]
    assert messages[0]["content"] == "write to <EMAIL_ADDRESS>"
    assert messages[1]["content"][0]["text"] == "card **** **** **** 1111"
    assert messages[1]["content"][1] is body["messages"][1]["content"][1]
    assert messages[2] is body["messages"][2]
    assert body["messages"][0]["content"] == f"write to {EMAIL}"


async def test_flag_passes_the_body_unchanged_and_records(guard: Guardrails) -> None:
    body = _chat("ssn 536-22-1234 and BLUEBIRD-42 launch")
    verdict = await guard.scan_request(body, "chat", "flag", "flag")
    assert not verdict.blocked and verdict.body is body
    assert {(f.kind, f.entity_type, f.action) for f in verdict.findings} == {
        ("pii", "US_SSN", "flag"), ("pattern", "project-codename", "flag"),
    }


async def test_pattern_and_pii_actions_are_independent(guard: Guardrails) -> None:
    body = _chat(f"BLUEBIRD-7 ships; ping {EMAIL}")
    blocked = await guard.scan_request(body, "chat", "mask", "block")
    assert blocked.blocked and "project-codename" in blocked.message and "EMAIL_ADDRESS" not in blocked.message
    masked = await guard.scan_request(body, "chat", "off", "mask")
    assert masked.body["messages"][0]["content"] == f"<project-codename> ships; ping {EMAIL}"


async def test_clean_body_is_returned_as_is(guard: Guardrails) -> None:
    body = _chat("Summarise the plot of Hamlet in three sentences.")
    verdict = await guard.scan_request(body, "chat", "block", "block")
    assert verdict == type(verdict)(False, [], body, None) and verdict.body is body


async def test_completions_prompt_and_embeddings_input(guard: Guardrails) -> None:
    prompt = await guard.scan_request({"prompt": ["fine", f"to {EMAIL}"]}, "completions", "mask", "off")
    assert prompt.body["prompt"] == ["fine", "to <EMAIL_ADDRESS>"]
    embeddings = await guard.scan_request({"input": ["ip 10.0.0.7", "clean"]}, "embeddings", "mask", "off")
    assert embeddings.body["input"] == ["ip <IP_ADDRESS>", "clean"]


async def test_token_ids_without_a_tokenizer_are_never_passed_unread(guard: Guardrails) -> None:
    with pytest.raises(Unscannable, match="token ids"):
        await guard.scan_request({"input": ["fine", [1, 2, 3]]}, "embeddings", "flag", "off")


async def test_response_bodies_are_scanned_on_output(guard: Guardrails) -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Call (212) 555-0134"}}]}
    verdict = await guard.scan_response(chat, "chat", "mask", "off")
    assert verdict.body["choices"][0]["message"]["content"] == "Call <PHONE_NUMBER>"
    assert verdict.findings[0].direction == "output"
    completion = {"choices": [{"index": 0, "text": "IBAN DE89 3704 0044 0532 0130 00"}]}
    blocked = await guard.scan_response(completion, "completions", "block", "off")
    assert blocked.blocked and "response contained IBAN_CODE" in blocked.message


def test_scan_text_masks_a_plain_string(guard: Guardrails) -> None:
    verdict = guard.scan_text(f"from {EMAIL}", "input", "mask", "mask")
    assert verdict.body == "from <EMAIL_ADDRESS>"


def test_words_become_a_whole_word_case_insensitive_pattern() -> None:
    guard = Guardrails([], patterns=[("secret-projects", words_to_regex(["project bluebird", "Falcon"]))])
    verdict = guard.scan_text("Is Project Bluebird related to falcon? Not falconry.", "input", "mask", "mask")
    assert verdict.body == "Is <secret-projects> related to <secret-projects>? Not falconry."


def test_configuration_errors_are_reported() -> None:
    with pytest.raises(ValueError, match="NOT_AN_ENTITY"):
        Guardrails(["EMAIL_ADDRESS", "NOT_AN_ENTITY"])
    with pytest.raises(ValueError, match=r"PERSON.*ner: true"):
        Guardrails(["PERSON"])
    with pytest.raises(ValueError, match="pattern 'bad'"):
        Guardrails([], patterns=[("bad", "([a-z")])


async def test_unknown_action_is_refused(guard: Guardrails) -> None:
    with pytest.raises(ValueError, match="redact"):
        await guard.scan_request(_chat("hi"), "chat", "redact", "off")  # type: ignore[arg-type]
