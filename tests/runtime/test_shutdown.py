"""Stopping the engine leaves nothing behind. Stops the shared engine, so conftest.py runs it last."""

from __future__ import annotations

import psutil
import pytest

from runtime import EmbeddedEngine, EngineState, EngineUnavailableError

pytestmark = [pytest.mark.runtime, pytest.mark.asyncio(loop_scope="session")]


def engine_processes(before: set[int]) -> list[psutil.Process]:
    # multiprocessing's resource tracker is the standard library's, lives as long as this process, and holds nothing.
    return [child for child in psutil.Process().children(recursive=True)
            if child.pid not in before and "resource_tracker" not in " ".join(child.cmdline())]


async def test_stop_ends_the_engine_processes_and_refuses_new_requests(
    engine: EmbeddedEngine, processes_before_engine: set[int]
) -> None:
    assert engine_processes(processes_before_engine), "a running engine has its core in a child process"
    sockets = engine._socket_dir

    await engine.stop()

    assert engine.status.state is EngineState.STOPPED
    assert engine_processes(processes_before_engine) == []
    assert sockets is not None and not sockets.exists()
    with pytest.raises(EngineUnavailableError) as raised:
        await engine.chat({"messages": [{"role": "user", "content": "hi"}]}, "after-stop")
    assert raised.value.state == "stopped"
