"""Batch lines yield to interactive traffic on the embedded engine (real vLLM on the CPU): an interactive request's
time to first token while a batch keeps the engine busy stays within 2x of the idle figure.

How it can hold: the route's `batch.concurrency` (3) is below the engine's `max_num_seqs` (4), so a seat is always
free for an interactive request, and its priority (0, against the batch's 1000) puts it first in the engine's queue,
so it is scheduled at the next step, beside the batch's decoding sequences. What it pays is that step being a batched
one (its prefill with three sequences' decodes) and the step already under way when it arrived. The measurement is
benchmarks/batch_bench.py's (`--priority`), so the benchmark and this test report the same figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.batch_bench import measure_priority, priority_table

pytestmark = [pytest.mark.runtime]


async def test_interactive_ttft_under_a_saturating_batch_stays_within_2x_of_idle(model_path: Path,
                                                                                  tmp_path: Path) -> None:
    figures = await measure_priority(model_path, max_num_seqs=4, batch_concurrency=3, samples=7, folder=tmp_path)
    print(priority_table(figures))

    # Every busy sample was taken with the batch holding all the seats it may hold.
    assert len(figures.batch_running_at_each) == 7 and min(figures.batch_running_at_each) >= 3
    assert figures.busy_median_s <= 2 * figures.idle_median_s, priority_table(figures)
