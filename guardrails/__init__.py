"""Content guardrails on prompts and completions: PII (Presidio) and the admin's own patterns.

block refuses, mask rewrites the text before it leaves the gateway, flag only records. Works on plain
text and OpenAI-shaped bodies, whichever provider serves the route.
"""

from guardrails.bodies import Op, Tokenizer, Unscannable
from guardrails.detect import GuardrailError, words_to_regex
from guardrails.engine import DEFAULT_PHONE_REGIONS, NER_MODEL
from guardrails.guard import Action, Direction, Finding, Guardrails, Verdict
from guardrails.stream import StreamScanner, clip_text

__all__ = [
    "DEFAULT_PHONE_REGIONS",
    "NER_MODEL",
    "Action",
    "Direction",
    "Finding",
    "GuardrailError",
    "Guardrails",
    "Op",
    "StreamScanner",
    "Tokenizer",
    "Unscannable",
    "Verdict",
    "clip_text",
    "words_to_regex",
]
