"""Presidio loads without torch and transformers (hundreds of MB) when no guardrail needs an NLP model, and
without what it imports for features the guardrails do not use (spaCy itself unless NER is on, spaCy's command
line, the anonymizer's cipher).

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

# The gateway serves while Presidio loads: held here until the test lets the load finish.
SERVES_WHILE_LOADING = """
import json, threading
import guardrails.engine as engine
from guardrails import Guardrails

gate = threading.Event()
build = engine._build_analyzer
def held_build(key):
    gate.wait(30)
    return build(key)
engine._build_analyzer = held_build

guard = Guardrails(["EMAIL_ADDRESS", "PHONE_NUMBER"])
guard.warm_up_in_background()
clean = guard.scan_text("Hello there, how are you today?", "input", "block", "off")
built_while_clean = bool(engine._analyzers)
result = {}
suspect = threading.Thread(target=lambda: result.update(verdict=guard.scan_text("mail a.b@example.com", "input",
                                                                                  "block", "off")))
suspect.start()
suspect.join(1.0)
waited = suspect.is_alive()
gate.set()
suspect.join(60)
verdict = result["verdict"]
print(json.dumps({"clean_blocked": clean.blocked, "clean": clean.clean, "built_while_clean": built_while_clean,
                  "waited": waited, "blocked": verdict.blocked, "found": [f.entity_type for f in verdict.findings]}))
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


# Loaded later, when something uses it: spaCy's command line (typer, weasel, httpx, jinja2) and the cipher.
UNUSED_PARTS = """
import json, sys
from guardrails import Guardrails
from guardrails.engine import analyzer_for

guard = Guardrails(["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"])
guard.warm_up()
loaded = sorted(name for name in ("typer", "weasel", "httpx", "jinja2", "cryptography", "thinc", "numpy",
                                  "spacy.strings") if name in sys.modules)
engine = analyzer_for(guard.detector.key)
url_compiled = [p.name for r in engine.registry.recognizers if r.name == "UrlRecognizer" for p in r.patterns
                if p.compiled_regex is not None]
# Every regex Presidio compiles lands in the regex module's cache: a request after the warm-up adds none (an IBAN
# would: its country's format is compiled when the first IBAN of that country is seen).
import regex._main
compiled_before = len(regex._main._cache)
text = "mail jane.doe@example.com, call +1 415 555 0132, card 4111 1111 1111 1111, host 192.168.1.20"
verdict = guard.scan_text(text, "input", "mask", "off")
compiled_by_request = len(regex._main._cache) - compiled_before

from presidio_analyzer import Pattern
try:
    Pattern("broken", "(unclosed", 0.5)
    broken_pattern = "accepted"
except ValueError:
    broken_pattern = "rejected"

import spacy
from spacy.cli import download
from presidio_anonymizer import AnonymizerEngine, DeanonymizeEngine
from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

key = "WmZq4t7w!z%C&F)J"
found = [RecognizerResult("EMAIL_ADDRESS", 5, 12, 0.9)]
sealed = AnonymizerEngine().anonymize("mail a@b.com", found, {"EMAIL_ADDRESS": OperatorConfig("encrypt", {"key": key})})
opened = DeanonymizeEngine().deanonymize(sealed.text, sealed.items, {"DEFAULT": OperatorConfig("decrypt", {"key": key})})
print(json.dumps({"loaded": loaded, "compiled_by_request": compiled_by_request, "url_compiled": url_compiled,
                  "masked": verdict.body, "broken_pattern": broken_pattern, "spacy_version": spacy.info()["spacy_version"],
                  "download": callable(download), "opened": opened.text, "sealed": sealed.text != "mail a@b.com"}))
"""

DEFERRED = """
import json, sys, threading
sys.path.insert(0, {folder!r})
from guardrails.hidden_packages import deferred_modules

seen = {{}}
def import_in_other_thread():
    import eager
    seen["other_thread_ran"] = "LOADED" in eager.__dict__
with deferred_modules({{"heavy": ("compute",), "heavypkg": (), "eager": ()}}):
    import heavy
    from heavy import compute
    import heavypkg.sub
    worker = threading.Thread(target=import_in_other_thread)
    worker.start()
    worker.join()
seen["ran_at_import"] = "LOADED" in heavy.__dict__
seen["compute"] = compute(2)
seen["ran_once_used"] = heavy.LOADED
seen["submodule"] = heavypkg.sub.SUB
seen["package_ran_for_submodule"] = "LOADED" in heavypkg.__dict__
seen["package_value"] = heavypkg.VALUE
seen["missing"] = hasattr(heavy, "nothing")
print(json.dumps(seen))
"""

# A package deferred with its submodule: its own code runs first once a stand-in is used, as in a plain import.
DEFERRED_PACKAGE = """
import json, sys, typing
sys.path.insert(0, {folder!r})
from guardrails.hidden_packages import deferred_modules

seen = {{}}
with deferred_modules({{"pkg": (), "pkg.core": ("Thing",)}}):
    from pkg.core import Thing
    import pkg
typing.List[Thing]
seen["loaded_by_a_probe"] = "ORDER" in pkg.__dict__
class Sub(Thing):
    pass
seen["order"] = pkg.ORDER
seen["isinstance"] = isinstance(Sub(), Thing)
seen["issubclass"] = issubclass(Sub, Thing)
seen["one_class"] = Sub.__mro__[1] is sys.modules["pkg.core"].Thing is pkg.Thing
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


def test_clean_text_is_served_while_presidio_loads_and_a_suspect_text_waits_for_it() -> None:
    assert _run(SERVES_WHILE_LOADING) == {"clean_blocked": False, "clean": True, "built_while_clean": False,
                                          "waited": True, "blocked": True, "found": ["EMAIL_ADDRESS"]}


def test_the_entities_known_without_presidio_are_presidios_own() -> None:
    from guardrails.engine import PATTERN_ENTITIES_EN, EngineKey, analyzer_for

    engine = analyzer_for(EngineKey("en", False, ("US",)))
    assert frozenset(engine.get_supported_entities(language="en")) == PATTERN_ENTITIES_EN


def test_ner_turned_on_after_a_pattern_only_import_still_finds_names() -> None:
    assert _run(NER_AFTER_PATTERNS) == {"masked": "The report was written by <PERSON> last year."}


def test_packages_are_hidden_from_the_importing_thread_only_and_only_inside() -> None:
    assert _run(OTHER_THREAD) == {"this_thread": "hidden", "other_thread": "colorsys", "after": "colorsys"}


def test_guardrails_leave_unused_parts_unloaded_and_the_warm_up_covers_what_requests_use() -> None:
    result = _run(UNUSED_PARTS)
    assert result["loaded"] == []
    assert result["compiled_by_request"] == 0
    assert result["url_compiled"] == []
    assert result["masked"] == "mail <EMAIL_ADDRESS>, call <PHONE_NUMBER>, card **** **** **** 1111, host <IP_ADDRESS>"
    # Presidio checks patterns made after its import as it always did.
    assert result["broken_pattern"] == "rejected"
    # What stayed unloaded loads when used.
    assert result["spacy_version"] and result["download"] is True
    assert result["sealed"] is True and result["opened"] == "mail a@b.com"


def test_deferred_modules_run_on_first_use_only_in_the_importing_thread(tmp_path: Path) -> None:
    (tmp_path / "heavy.py").write_text("LOADED = True\n\ndef compute(x):\n    return x * 21\n")
    (tmp_path / "eager.py").write_text("LOADED = True\n")
    (tmp_path / "heavypkg").mkdir()
    (tmp_path / "heavypkg" / "__init__.py").write_text("LOADED = True\nVALUE = 7\n")
    (tmp_path / "heavypkg" / "sub.py").write_text("SUB = 1\n")
    assert _run(DEFERRED.format(folder=str(tmp_path))) == {
        "other_thread_ran": True, "ran_at_import": False, "compute": 42, "ran_once_used": True, "submodule": 1,
        "package_ran_for_submodule": False, "package_value": 7, "missing": False,
    }


def test_a_deferred_package_runs_before_its_deferred_submodule_whose_stand_ins_act_as_classes(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("ORDER = []\nfrom .core import Thing\nORDER.append('pkg')\n")
    (tmp_path / "pkg" / "core.py").write_text("from . import ORDER\nORDER.append('core')\n\nclass Thing:\n    pass\n")
    assert _run(DEFERRED_PACKAGE.format(folder=str(tmp_path))) == {
        "loaded_by_a_probe": False, "order": ["core", "pkg"], "isinstance": True, "issubclass": True,
        "one_class": True,
    }
