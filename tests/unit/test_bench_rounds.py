"""bench/run.py's rounds: each ratio is taken within a round, and the median round's is reported."""

from __future__ import annotations

import pytest

from conftest import load_bench

run = load_bench("run")


def tool(name: str, **seconds: float | None) -> object:
    result = run.ToolResult(name)
    for phase, s in seconds.items():
        result.phases[phase] = (run.PhaseResult(ok=True, seconds=s, peak_rss_bytes=int(50e6 + 1e6 * s))
                                if s is not None else run.PhaseResult(ok=False, error="boom"))
    return result


def test_each_phase_is_the_median_round_with_every_round_kept() -> None:
    rounds = [{"raksha": tool("raksha", full=6.0)}, {"raksha": tool("raksha", full=4.0)},
              {"raksha": tool("raksha", full=5.0)}]
    merged = run.merge_results(rounds)["raksha"].phases["full"]
    assert merged.ok and merged.seconds == 5.0 and merged.seconds_rounds == [6.0, 4.0, 5.0]
    assert merged.peak_rss_bytes == int(55e6)  # that round's own figures, not a mix


def test_a_phase_failed_in_any_round_is_reported_failed() -> None:
    rounds = [{"raksha": tool("raksha", full=6.0)}, {"raksha": tool("raksha", full=None)}]
    merged = run.merge_results(rounds)["raksha"]
    assert not merged.phases["full"].ok and merged.phases["full"].error == "round 2 of 2: boom"
    assert not merged.complete


def test_ratios_are_paired_within_rounds_then_the_median_round_is_taken() -> None:
    # The disk was twice as fast in round 2: every tool was, and the ratio within each round holds.
    rounds = [{"raksha": tool("raksha", full=6.0), "restic": tool("restic", full=15.0)},
              {"raksha": tool("raksha", full=3.0), "restic": tool("restic", full=8.1)},
              {"raksha": tool("raksha", full=5.0), "restic": tool("restic", full=13.0)}]
    per_round = [run._speed_figures(r["raksha"], [r["restic"]]) for r in rounds]
    (full,) = [f for f in run.merge_figures(per_round) if f.key == "full_speedup_vs_restic"]
    assert full.rounds == pytest.approx([2.5, 2.7, 2.6]) and full.value == pytest.approx(2.6)


def test_an_even_count_takes_the_middle_round_worse_for_the_target() -> None:
    def pct(value: float) -> object:
        return run.Figure(key="incremental_pct_of_full", name="pct", value=value, target=5.0, op="<=")

    def speed(value: float) -> object:
        return run.Figure(key="full_speedup_vs_restic", name="speed", value=value, target=4.0, op=">=")

    merged = run.merge_figures([[pct(4.0), speed(4.2)], [pct(6.0), speed(3.8)]])
    assert [f.value for f in merged] == [6.0, 3.8]


def test_peak_memory_is_the_largest_of_any_round() -> None:
    rounds = [[f for f in run._rss_figures(tool("raksha", full=s), []) if f.key == "raksha_peak_rss_mb"]
              for s in (10.0, 30.0, 20.0)]
    (rss,) = run.merge_figures(rounds)
    assert rss.value == 80.0 and rss.rounds == [60.0, 80.0, 70.0]


def test_the_device_floor_is_the_median_round_with_every_round_kept() -> None:
    floors = [{"backup_seconds": 5.1, "restore_seconds": 4.7}, None,
              {"backup_seconds": 3.1, "restore_seconds": 5.8}, {"backup_seconds": 4.0, "restore_seconds": 5.0}]
    merged = run.merge_floors(floors)
    assert merged is not None
    assert merged["backup_seconds"] == 4.0 and merged["restore_seconds"] == 5.0 and len(merged["rounds"]) == 3
    assert run.merge_floors([None, None]) is None
