"""Step 6 of the pipeline: target choice (split.py), retries and fallbacks (upstream.py), breakers, shadows."""

from gateway.routing.upstream import Resilience, complete, open_stream, upstream_failure

__all__ = ["Resilience", "complete", "open_stream", "upstream_failure"]
