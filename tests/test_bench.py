"""The benchmarks' own arithmetic (bench/), where a figure of the one GPU run could come out wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ on the path, as its scripts run (they import `data` and each other by module name)."""
    monkeypatch.syspath_prepend(str(BENCH))


def run(trials: int, wall_s: float, span_s: float, complete: bool = True) -> dict:
    return {"complete": complete, "trials": trials, "wall_s": wall_s, "trials_span_s": span_s}


@pytest.mark.parametrize("cut", ["packed", "sequential"])
def test_a_packing_ratio_from_a_run_cut_at_its_timeout_says_so(bench: None, cut: str) -> None:
    from bench_search import packing_ratios
    from data import Results

    whole = Results("bench_search", smoke=True)
    packing_ratios(run(8, 40.0, 20.0), run(3, 60.0, 30.0), whole, " (fused trials)")
    assert [row["value"] for row in whole.rows] == [2.75, 4.0]  # (60 + 5 x 30 / 3) / 40; (30 / 3) / (20 / 8)
    assert not any("INCOMPLETE" in row["case"] for row in whole.rows)

    partial = Results("bench_search", smoke=True)
    packed, seq = run(8, 40.0, 20.0, complete=cut != "packed"), run(3, 60.0, 30.0, complete=cut != "sequential")
    packing_ratios(packed, seq, partial, " (fused trials)")
    assert len(partial.rows) == 2
    marked = "(fused trials) (INCOMPLETE: cut at the timeout or failed)"
    assert all(row["case"].endswith(marked) for row in partial.rows)
