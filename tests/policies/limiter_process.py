"""One gateway's limiter in a process of its own: `python -m tests.policies.limiter_process STORAGE SPEC`.

SPEC is JSON: `policy` (the policy's sections), `requests`, `prompt_tokens`, `estimate`, `completion_tokens` and
`cost`. The process builds its Governor, prints "ready", waits for a line on stdin so that every process starts
together, makes all its requests at once (alice's and bob's in turn), settles the admitted ones without waiting,
closes its store (which lands the settles) and prints the number admitted and its store's errors as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from policies.keys import Principal
from policies.limiter import Governor
from policies.limiter_storage import open_counter_store
from tests.policies.factory import make_policy

PRINCIPALS = (Principal("k-alice", "alice", ("eng",)), Principal("k-bob", "bob", ("eng",)))


async def main(storage: str, spec: dict[str, Any]) -> None:
    store = open_counter_store(storage, timeout_s=5.0)
    governor = Governor(make_policy(**spec["policy"]), store)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    count = int(spec["requests"])
    results = await asyncio.gather(*(
        governor.admit(PRINCIPALS[i % 2], "chat-small", int(spec["prompt_tokens"]), int(spec["estimate"]))
        for i in range(count)
    ))
    for admission in results:
        if admission.allowed:
            governor.settle_soon(admission, int(spec["completion_tokens"]), int(spec["cost"]))
    await store.close()
    print(json.dumps({"admitted": sum(a.allowed for a in results), "errors": store.errors, "lost": store.lost}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
