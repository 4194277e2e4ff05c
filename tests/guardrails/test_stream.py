import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrails import Guardrails, StreamScanner, words_to_regex
from guardrails.stream import _NER_TAIL, _TAIL, MAX_HOLD_CHARS, _tail_start, clip_text

MESSAGE = (
    "Done. Mail anna.k@example.net, call +1-415-555-0132, card 4111-1111-1111-1111, "
    "IBAN GB33BUKB20201555555555, SSN 612-34-5678, host 172.16.4.2, code BLUEBIRD-42. Bye"
)


def _stream(scanner: StreamScanner, chunks: list[str]) -> str:
    return "".join(scanner.feed(chunk) for chunk in chunks) + scanner.finish()


SHORT_MESSAGES = {
    "EMAIL_ADDRESS": "Mail anna.k@example.net today",
    "PHONE_NUMBER": "Call +44 20 7946 0958 now",
    "CREDIT_CARD": "Card 4111 1111 1111 1111 ok",
    "IBAN_CODE": "To GB82 WEST 1234 5698 7654 32.",
    "US_SSN": "SSN 612-34-5678, thanks",
    "IP_ADDRESS": "Host 2001:db8::8a2e:370:7334 up",
    "project-codename": "Ship BLUEBIRD-42 soon",
}


@pytest.mark.parametrize("entity", SHORT_MESSAGES)
def test_every_split_point_masks_like_the_whole_text(guard: Guardrails, entity: str) -> None:
    message = SHORT_MESSAGES[entity]
    whole = guard.scan_text(message, "output", "mask", "mask")
    assert [f.entity_type for f in whole.findings] == [entity]
    for split in range(1, len(message)):
        scanner = StreamScanner(guard, "mask", "mask")
        assert _stream(scanner, [message[:split], message[split:]]) == whole.body, split
        assert scanner.findings == whole.findings, split


def test_token_sized_deltas_mask_like_the_whole_text(guard: Guardrails) -> None:
    whole = guard.scan_text(MESSAGE, "output", "mask", "mask")
    assert whole.body.count("<") == 6 and "****-****-****-1111" in whole.body
    for size in (1, 3):
        scanner = StreamScanner(guard, "mask", "mask")
        assert _stream(scanner, [MESSAGE[i : i + size] for i in range(0, len(MESSAGE), size)]) == whole.body


def test_clean_text_is_released_at_once_but_the_word_in_progress() -> None:
    guard = Guardrails(["EMAIL_ADDRESS", "PHONE_NUMBER"])
    scanner = StreamScanner(guard, "mask", "off")
    assert scanner.feed("The capital of France is Par") == "The capital of France is "
    assert scanner.feed("is. It has ") == "Paris. It has "
    assert scanner.feed("2 million people") == "2 million "
    assert scanner.finish() == "people"


def test_only_the_number_that_may_grow_is_held(guard: Guardrails) -> None:
    scanner = StreamScanner(guard, "mask", "off")
    assert scanner.feed("Sure, you can call 415 555") == "Sure, you can call "
    assert scanner.feed(" 0132 today.") == "<PHONE_NUMBER> "
    assert scanner.finish() == "today."


def test_a_phrase_pattern_split_across_deltas_is_masked() -> None:
    guard = Guardrails([], patterns=[("codename", words_to_regex(["project bluebird"]))])
    scanner = StreamScanner(guard, "off", "mask")
    assert scanner.feed("Next quarter project ") == "Next quarter "
    assert _stream(scanner, ["Bluebird launches."]) == "<codename> launches."


def test_block_on_output_ends_the_stream_without_leaking(guard: Guardrails) -> None:
    scanner = StreamScanner(guard, "block", "off")
    released = scanner.feed("Your SSN is 612-")
    released += scanner.feed("34-5678 and more")
    assert scanner.blocked and "US_SSN" in scanner.message
    assert "612" not in released
    assert scanner.feed(" even more") == "" and scanner.finish() == ""
    assert [(f.entity_type, f.action, f.direction) for f in scanner.findings] == [("US_SSN", "block", "output")]


def test_flag_releases_the_text_unchanged(guard: Guardrails) -> None:
    scanner = StreamScanner(guard, "flag", "flag")
    assert _stream(scanner, [MESSAGE[:40], MESSAGE[40:]]) == MESSAGE
    assert len(scanner.findings) == 7


async def test_async_feed_matches_sync_feed(guard: Guardrails) -> None:
    scanner = StreamScanner(guard, "mask", "mask")
    released = "".join([await scanner.afeed(MESSAGE[i : i + 7]) for i in range(0, len(MESSAGE), 7)])
    released += await scanner.afinish()
    assert released == guard.scan_text(MESSAGE, "output", "mask", "mask").body


def test_a_long_run_without_spaces_is_not_held_for_ever() -> None:
    guard = Guardrails(["EMAIL_ADDRESS"])
    scanner = StreamScanner(guard, "mask", "off")
    released = scanner.feed("data:" + "A" * 1000)
    assert 700 <= len(released) < 1005


@pytest.mark.parametrize("action", ["mask", "block"])
def test_off_direction_actions_are_validated(guard: Guardrails, action: str) -> None:
    with pytest.raises(ValueError, match="unknown guardrail action"):
        StreamScanner(guard, action, "hide")  # type: ignore[arg-type]


def test_a_long_run_of_digit_tokens_is_released_in_bounded_time() -> None:
    # Each token can hold the tail's digit in several places: before the tail rule matched tokens one way only, ten
    # of them followed by a word that cannot join took 50 s, and a 64 KB delta would have held a worker for minutes.
    guard = Guardrails(["EMAIL_ADDRESS"])
    scanner = StreamScanner(guard, "mask", "off")
    delta = "-41809, " * 8000 + "Zz"
    assert scanner.feed(delta) == delta[:-2]
    assert scanner.finish() == "Zz"
    assert clip_text("-41809, " * 60 + "zz 12", 484) == "-41809, " * 60 + "zz "


_PLAIN_FORMS = r"(?:\S*\d\S*|[A-Z0-9]{1,4}|[^\w\s]{1,4})"
_PLAIN_SEP = r"[ \u00a0]{1,2}"


def _backtracking_tail(joinable: str) -> re.Pattern[str]:
    """The tail rule as it was written first, every token free to match in several ways: the reference."""
    return re.compile(rf"(?:{joinable}{_PLAIN_SEP})*{joinable}[ \u00a0]{{0,2}}\Z|\S*\Z")


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="12AaSz -,.'\u00a0", max_size=14))
def test_the_one_way_tail_rule_finds_the_tail_the_backtracking_one_finds(text: str) -> None:
    name_word = r"[A-Z][\w'\u2019.-]*"
    for reference, rule in ((_backtracking_tail(_PLAIN_FORMS), _TAIL),
                            (_backtracking_tail(f"(?:{_PLAIN_FORMS}|{name_word})"), _NER_TAIL)):
        assert reference.search(text).start() == rule.pattern.search(text).start()


_WORDS = st.text(alphabet="1Aa\u0663\u00c9.-'\u2019", min_size=1, max_size=6)
_SPACES = st.text(alphabet=" \u00a0\t\n\u2028\x1c", min_size=1, max_size=3)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(_WORDS, _SPACES), max_size=8), st.booleans(), st.integers(0, 2 * MAX_HOLD_CHARS + 40))
def test_the_last_word_shortcut_finds_the_tail_the_search_finds(pairs, ends_in_space: bool, filler: int) -> None:
    # Long fillers put the search's window start inside the last word, inside a run, or before both.
    text = "x" * filler + "".join(word + space for word, space in pairs)
    if not ends_in_space:
        text = text.rstrip()
    for rule in (_TAIL, _NER_TAIL):
        expected = rule.pattern.search(text, max(0, len(text) - 2 * MAX_HOLD_CHARS)).start()
        assert _tail_start(rule, text) == expected
