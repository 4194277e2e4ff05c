"""A few compiled regexes, gated by substring checks, that prove a text holds no candidate for Presidio.

Each check is a necessary condition of a Presidio recognizer: a text none of them matches cannot
produce that finding, so skipping Presidio there changes no result (tests/guardrails check this on the
quality set and on random number-laden texts). Entities without a condition here disable the prefilter.
Every regex starts with a literal or \\d so the engine skips ahead instead of trying every position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import regex
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import _VALID_PUNCTUATION

# The separators phonenumbers' matcher accepts between digit blocks, up to 4 in a row (its own class,
# private there, so this stays exactly in step); card and SSN separators (space, '-', '.') are among them.
_SEPARATOR = "[" + _VALID_PUNCTUATION + "]{0,4}"
_ASCII_DIGITS = "0123456789"
# The fewest digits each entity's match can hold.
_MIN_DIGITS = {"CREDIT_CARD": 12, "US_SSN": 9}
# A number written with + may belong to any country; the shortest national numbers anywhere have 4 digits.
_INTERNATIONAL_PHONE_DIGITS = 4

PREFILTERED_ENTITIES = frozenset({"EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER", *_MIN_DIGITS})


class Prefilter:
    """Call it with a text: False proves Presidio would find none of the entities it was built for."""

    def __init__(self, entities: Iterable[str], phone_regions: Iterable[str]) -> None:
        wanted = set(entities)
        self._email = regex.compile(r"@[\w-]+\.\w") if "EMAIL_ADDRESS" in wanted else None
        self._ipv6 = regex.compile(r"::|(?:[0-9A-Fa-f]{1,4}:){7}") if "IP_ADDRESS" in wanted else None
        self._plus = None
        digit_counts = [count for entity, count in _MIN_DIGITS.items() if entity in wanted]
        if "PHONE_NUMBER" in wanted:
            rest = _INTERNATIONAL_PHONE_DIGITS - 1
            self._plus = regex.compile(rf"[+\uff0b]{_SEPARATOR}\d(?:{_SEPARATOR}\d){{{rest},}}")
            digit_counts.append(_min_national_digits(phone_regions))
        after_first_digit = []
        if "IBAN_CODE" in wanted:
            after_first_digit.append(r"(?<=[A-Z]{2}\d)\d")
        if "IP_ADDRESS" in wanted:
            after_first_digit.append(r"\d{0,2}\.\d{1,3}\.\d{1,3}\.\d")
        if digit_counts:
            after_first_digit.append(rf"(?:{_SEPARATOR}\d){{{min(digit_counts) - 1},}}")
        self._digits = regex.compile(r"\d(?:" + "|".join(after_first_digit) + ")") if after_first_digit else None
        # The characters one of the checks below needs, for ASCII text; one search of these costs ~0.3 µs where
        # the checks on a clean text cost ~2 µs (a guarded stream runs them for every delta).
        needed = "".join(char for char, check in (("@", self._email), (":", self._ipv6), ("+", self._plus),
                                                  ("0-9", self._digits)) if check is not None)
        self._ascii_needed = re.compile(f"[{needed}]") if needed else None

    def __call__(self, text: str) -> bool:
        if text.isascii() and (self._ascii_needed is None or self._ascii_needed.search(text) is None):
            return False
        if self._email is not None and "@" in text and self._email.search(text):
            return True
        if self._ipv6 is not None and ":" in text and self._ipv6.search(text):
            return True
        if self._plus is not None and ("+" in text or "\uff0b" in text) and self._plus.search(text):
            return True
        if self._digits is None:
            return False
        # Non-ASCII texts may hold digits of other scripts, which phonenumbers and \d both read as digits.
        has_digit = not text.isascii() or any(map(text.__contains__, _ASCII_DIGITS))
        return has_digit and self._digits.search(text) is not None


def _min_national_digits(regions: Iterable[str]) -> int:
    regions = list(regions)
    lengths = [
        min(metadata.general_desc.possible_length)
        for region in regions
        if (metadata := PhoneMetadata.metadata_for_region(region.upper())) is not None
    ]
    if len(lengths) != len(regions):
        raise ValueError(f"unknown phone regions in {regions}")
    return min(lengths)


def build_prefilter(entities: Iterable[str], phone_regions: Iterable[str]) -> Prefilter | None:
    """The prefilter for these entities, or None when one of them has no necessary condition here."""
    wanted = set(entities)
    if not wanted or not wanted <= PREFILTERED_ENTITIES:
        return None
    return Prefilter(wanted, phone_regions)
