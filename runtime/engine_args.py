"""vLLM engine arguments and process environment for an engine embedded in the gateway.

The policy's `engine:` mapping is passed to vLLM's `AsyncEngineArgs` as it is; the defaults below only
fill what it leaves out, so an admin can override every one of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

# Equal priorities degrade to arrival order, so priority scheduling costs nothing when tiers are unused,
# and lets a route's lower priority number be served first when they are.
COMMON_DEFAULTS: dict[str, object] = {
    "scheduling_policy": "priority",
    "disable_log_stats": True,
}

CPU_DEFAULTS: dict[str, object] = {
    # bf16 on CPUs without AVX-512 BF16 falls back to slow kernels (4-5 tokens/s instead of 15+).
    "dtype": "float32",
    # torch.compile took minutes at start-up and gave no speed-up for small models on CPU.
    "enforce_eager": True,
    # Without an explicit size vLLM sizes the KV cache from the NUMA node's free memory and refuses to
    # start on hosts where that figure is small; 1 GiB holds 16 sequences of 2k tokens of a 135M model.
    "kv_cache_memory_bytes": 1 << 30,
}


def engine_state_dir() -> Path:
    """Where vLLM's sockets and caches go, whatever the working directory: $LOCKGATE_VAR_DIR/vllm, else the user's
    cache folder ($XDG_CACHE_HOME/lockgate/vllm, else ~/.cache/lockgate/vllm) rather than vLLM's own defaults."""
    if override := os.environ.get("LOCKGATE_VAR_DIR"):
        return Path(override) / "vllm"
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and is ignored.
    return (Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache") / "lockgate" / "vllm"


def prepare_environment() -> Path:
    """Set vLLM's process-wide settings before an engine starts, and return a fresh folder for its sockets.

    vLLM never unlinks its IPC sockets, so each engine gets its own folder, removed when the engine stops.
    Engine child processes read the environment when spawned; callers start engines one at a time.
    """
    state = engine_state_dir()
    (state / "rpc").mkdir(parents=True, exist_ok=True)
    (state / "cache").mkdir(parents=True, exist_ok=True)
    _remove_orphaned_socket_dirs(state / "rpc")
    sockets = Path(tempfile.mkdtemp(prefix=f"engine-{os.getpid()}-", dir=state / "rpc"))
    os.environ["VLLM_RPC_BASE_PATH"] = str(sockets)
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(state / "cache"),
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return sockets


def _remove_orphaned_socket_dirs(root: Path) -> None:
    """Socket folders of gateway processes that died without stopping their engines."""
    for folder in root.glob("engine-*-*"):
        pid = int(folder.name.split("-")[1])
        if not _process_exists(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_engine_args(
    model_path: Path, overrides: Mapping[str, object], served_model_name: str | None, on_cpu: bool
) -> dict[str, object]:
    """The keyword arguments for `AsyncEngineArgs`: defaults, then the policy's overrides."""
    args: dict[str, object] = dict(COMMON_DEFAULTS)
    if on_cpu:
        args.update(CPU_DEFAULTS)
    args.update(overrides)
    if on_cpu and args.get("dtype") == "auto":
        # "auto" picks bf16 from many checkpoints, which is the slow path on CPU (see CPU_DEFAULTS).
        args["dtype"] = "float32"
    args["model"] = str(model_path)
    args["tokenizer"] = str(model_path)
    if served_model_name:
        args["served_model_name"] = [served_model_name]
    return args
