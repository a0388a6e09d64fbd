"""Statistics of timings taken on a shared machine: ratios of steps taken side by side, and how far their median can be
trusted."""

from __future__ import annotations

import random
import statistics


def paired_ratios(ours: list[list[float]], baseline: list[list[float]]) -> list[list[float]]:
    """Step i of `ours` over step i of `baseline`, per process set: steps of the same round were taken seconds apart,
    so their ratio cancels the slower drifts of a shared host (which moved one model's own step by 50% in a run)."""
    return [[a / b for a, b in zip(mine, theirs)] for mine, theirs in zip(ours, baseline)]


def median_ci(
    groups: list[list[float]], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[float]:
    """Percentile-bootstrap interval of the median of all values: how far the median of this many noisy rounds can
    be trusted.

    ``groups`` holds one list per process. The bootstrap resamples the processes, then the values within each, so
    any spread between processes widens the interval along with the step-to-step noise; with one process it is the
    plain bootstrap of the median. A target verdict inside that interval is within the machine's resolution."""
    groups = [list(group) for group in groups if group]
    values = [value for group in groups for value in group]
    if len(values) < 2:
        return [values[0], values[0]] if values else [float("nan"), float("nan")]
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(
            [v for group in rng.choices(groups, k=len(groups)) for v in rng.choices(group, k=len(group))]
        )
        for _ in range(resamples)
    )
    tail = (1 - confidence) / 2
    return [medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]]
