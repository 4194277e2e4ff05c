import pytest

from guardrails import Guardrails

ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"]
CODENAME = ("project-codename", r"\bBLUEBIRD-\d+\b")


@pytest.fixture(scope="session")
def guard() -> Guardrails:
    return Guardrails(ENTITIES, score_threshold=0.5, patterns=[CODENAME])
