"""Detection quality on the labelled set, and proof that the prefilter changes no result.

Floors (precision / recall per entity, default pattern mode, threshold 0.5):
EMAIL_ADDRESS, CREDIT_CARD, IBAN_CODE, US_SSN: 1.00 / 1.00; PHONE_NUMBER: 1.00 / 0.85 (the Ofcom
drama range +44 7700 900xxx is not a valid number to phonenumbers); IP_ADDRESS: 0.85 / 1.00 (C++
"a::b" reads as IPv6).
"""

import random

import pytest

from guardrails import Guardrails
from guardrails.engine import analyzer_for
from tests.guardrails.conftest import ENTITIES
from tests.guardrails.quality_set import LABELLED, NEAR_MISSES

FLOORS = {
    "EMAIL_ADDRESS": (1.0, 1.0),
    "PHONE_NUMBER": (1.0, 0.85),
    "CREDIT_CARD": (1.0, 1.0),
    "IBAN_CODE": (1.0, 1.0),
    "US_SSN": (1.0, 1.0),
    "IP_ADDRESS": (0.85, 1.0),
}


def _counts(guard: Guardrails) -> dict[str, list[int]]:
    counts = {entity: [0, 0, 0] for entity in ENTITIES}  # true positives, predicted, expected
    for text, labels in [*LABELLED, *((t, {}) for t in NEAR_MISSES)]:
        spans = guard.detector.find(text, pii=True, patterns=False)
        for entity, values in labels.items():
            expected = [(text.index(v), text.index(v) + len(v)) for v in values]
            counts[entity][2] += len(expected)
            counts[entity][0] += sum(
                any(s.entity_type == entity and s.start < end and start < s.end for s in spans)
                for start, end in expected
            )
        for span in spans:
            counts[span.entity_type][1] += 1
    return counts


@pytest.mark.parametrize("entity", ENTITIES)
def test_precision_and_recall_meet_floors(guard: Guardrails, entity: str) -> None:
    true_positives, predicted, expected = _counts(guard)[entity]
    precision_floor, recall_floor = FLOORS[entity]
    assert expected >= 4, "each entity needs enough labelled examples"
    assert true_positives / max(predicted, 1) >= precision_floor
    assert true_positives / expected >= recall_floor


def _presidio_spans(guard: Guardrails, text: str) -> list[tuple[str, int, int]]:
    detector = guard.detector
    results = analyzer_for(detector.key).analyze(
        text, language="en", entities=detector.entities, score_threshold=detector.score_threshold
    )
    return sorted((r.entity_type, r.start, r.end) for r in results)


def _random_numberish_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.5:
            groups = [str(rng.randint(0, 10 ** rng.randint(1, 5))) for _ in range(rng.randint(1, 5))]
            pieces.append(rng.choice([" ", "-", ".", "/", ":", ""]).join(groups))
        elif kind < 0.7:
            pieces.append(rng.choice(["+", "(", "00 "]) + str(rng.randint(1, 999)) + " " + str(rng.randint(10**5, 10**9)))
        else:
            pieces.append(rng.choice(["word", "GB", "DE", "a@b", "x.y@z.io", "::", "ff:", "Order"]))
    return " ".join(pieces)


def test_prefilter_never_hides_a_finding(guard: Guardrails) -> None:
    rng = random.Random(7)
    texts = [t for t, _ in LABELLED] + NEAR_MISSES + [_random_numberish_text(rng) for _ in range(300)]
    hidden = [t for t in texts if _presidio_spans(guard, t) and not guard.detector.may_hold_pii(t)]
    assert hidden == []
    assert sum(bool(_presidio_spans(guard, t)) for t in texts) > 40, "the random texts must exercise Presidio"


def test_prefilter_passes_plain_prose_without_presidio(guard: Guardrails) -> None:
    prose = "Could you summarise the meeting notes from last week and list the three open questions?"
    assert not guard.detector.may_hold_pii(prose)
