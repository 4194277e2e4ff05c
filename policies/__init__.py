"""The policy model: schema and loading, RBAC, rate limits and budgets, token counting, prices."""

from policies.limiter import Admission, Governor, WindowState, format_duration
from policies.limiter_storage import CounterStore, StorageUnavailable, open_counter_store
from policies.prices import cost_micro_usd
from policies.rbac import Authorizer, explain
from policies.tokens import count_prompt_tokens, count_text_tokens, install_offline_encodings

__all__ = [
    "Admission",
    "Authorizer",
    "CounterStore",
    "Governor",
    "StorageUnavailable",
    "WindowState",
    "cost_micro_usd",
    "count_prompt_tokens",
    "count_text_tokens",
    "explain",
    "format_duration",
    "install_offline_encodings",
    "open_counter_store",
]
