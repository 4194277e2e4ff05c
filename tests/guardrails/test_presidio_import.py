"""Presidio loads without torch and transformers (hundreds of MB) when no guardrail needs an NLP model.

Each check runs in a fresh interpreter: the test process has imported Presidio already, and torch with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GATEWAY_BUILD = """
import json, sys
from gateway.guarding import build_guardrails
from policies.loader import parse_policy

POLICY = '''
version: 1
providers:
  up: {type: openai, base_url: "http://127.0.0.1:9/v1"}
routes:
  chat: {targets: [{provider: up, model: m}], guardrails: {input: {pii: block}, output: {pii: mask}}}
guardrails:
  pii: {entities: [EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD]}
'''
guard = build_guardrails(parse_policy(POLICY).policy)
loaded_after_build = sorted(name for name in ("torch", "transformers") if name in sys.modules)
verdict = guard.scan_text("mail jane.doe@example.com or call +1 415 555 0132", "input", "mask", "off")
found = sorted(f.entity_type for f in verdict.findings)

import torch
import transformers
total = float(torch.tensor([1.5, 2.5]).sum())
print(json.dumps({"loaded_after_build": loaded_after_build, "found": found, "masked": verdict.body,
                  "torch_sum": total, "transformers_has_version": bool(transformers.__version__)}))
"""

# A reload may turn NER on after Presidio was imported without torch: spaCy's NER model does not need it.
NER_AFTER_PATTERNS = """
import asyncio, json
from guardrails import Guardrails

Guardrails(["EMAIL_ADDRESS"])
ner = Guardrails(["PERSON"], ner=True)
body = {"messages": [{"role": "user", "content": "The report was written by Sarah Johnson last year."}]}
verdict = asyncio.run(ner.scan_request(body, "chat", "mask", "off"))
print(json.dumps({"masked": verdict.body["messages"][0]["content"]}))
"""

OTHER_THREAD = """
import json, threading
from guardrails.hidden_packages import hidden_packages

seen = {}
def import_in_other_thread():
    import colorsys
    seen["other_thread"] = colorsys.__name__
with hidden_packages(["colorsys"]):
    try:
        import colorsys
        seen["this_thread"] = "imported"
    except ModuleNotFoundError:
        seen["this_thread"] = "hidden"
    worker = threading.Thread(target=import_in_other_thread)
    worker.start()
    worker.join()
import colorsys
seen["after"] = colorsys.__name__
print(json.dumps(seen))
"""


def _run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gateway_guardrails_load_presidio_without_torch_and_still_find_pii() -> None:
    result = _run(GATEWAY_BUILD)
    assert result["loaded_after_build"] == []
    assert result["found"] == ["EMAIL_ADDRESS", "PHONE_NUMBER"]
    assert "jane.doe@example.com" not in result["masked"] and "555 0132" not in result["masked"]
    # vLLM imports torch later in the same process: it must load as if nothing had been hidden.
    assert result["torch_sum"] == 4.0
    assert result["transformers_has_version"] is True


def test_ner_turned_on_after_a_pattern_only_import_still_finds_names() -> None:
    assert _run(NER_AFTER_PATTERNS) == {"masked": "The report was written by <PERSON> last year."}


def test_packages_are_hidden_from_the_importing_thread_only_and_only_inside() -> None:
    assert _run(OTHER_THREAD) == {"this_thread": "hidden", "other_thread": "colorsys", "after": "colorsys"}
