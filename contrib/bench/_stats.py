"""Small statistics: percentiles, medians, and merging what the generator processes report."""

from __future__ import annotations

import collections
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def latency_summary(latencies_us: Iterable[int]) -> dict[str, float]:
    values = sorted(latencies_us)
    return {
        "p50_ms": round(percentile(values, 50) / 1000, 3),
        "p90_ms": round(percentile(values, 90) / 1000, 3),
        "p99_ms": round(percentile(values, 99) / 1000, 3),
        "p999_ms": round(percentile(values, 99.9) / 1000, 3),
        "max_ms": round(values[-1] / 1000, 3) if values else 0.0,
        "samples": len(values),
    }


def median(values: Iterable[float]) -> float:
    items = [v for v in values if v is not None]
    return float(statistics.median(items)) if items else float("nan")


class Merged:
    """What several generator processes saw, keyed by (group, phase)."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.results = results
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latencies: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
        for result in results:
            for group, phase, n in result.get("counts", []):
                self.counts[(group, phase)] += n
            for group, phase, values in result.get("latencies_us", []):
                self.latencies[(group, phase)].extend(values)

    def count(self, group: str, phases: Iterable[int]) -> int:
        return sum(self.counts[(group, p)] for p in phases)

    def latency(self, group: str, phases: Iterable[int]) -> dict[str, float]:
        out: list[int] = []
        for p in phases:
            out.extend(self.latencies.get((group, p), []))
        return latency_summary(out)

    def delta(self, key: str, first: int, last: int) -> float:
        """Sum over processes of a sampled counter's change between two phase bounds."""
        total = 0.0
        for result in self.results:
            samples = result.get("samples", [])
            if len(samples) > last:
                total += samples[last][key] - samples[first][key]
        return total

    def per_process(self, key: str, first: int, last: int) -> list[float]:
        out = []
        for result in self.results:
            samples = result.get("samples", [])
            if len(samples) > last:
                out.append(samples[last][key] - samples[first][key])
        return out

    def summed(self, key: str) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for result in self.results:
            total.update(result.get(key) or {})
        return total

    def groups(self) -> dict[str, collections.Counter[str]]:
        out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for result in self.results:
            for group, outcome in (result.get("groups") or {}).items():
                out[group].update(outcome)
        return out
