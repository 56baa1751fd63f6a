"""The HDR histograms of the load generator: one shape for all (microseconds, 1 µs to 60 s, three
significant digits), so that every histogram of a run, or of several runs, merges exactly.

A report carries each histogram as the base64 text of hdrhistogram's ``encode()``; ``decode`` reads it
back, ``merge`` adds histograms count by count (no resampling: the merged percentiles are those of one
histogram fed every value), and ``figures`` gives one "figures" object of ``report.schema.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hdrh.histogram import HdrHistogram

#: The lowest latency told apart from 0, in microseconds.
LOWEST = 1
#: The highest latency recorded, in microseconds (60 s); ``record`` clamps longer ones to it.
HIGHEST = 60_000_000
#: Significant decimal digits kept at every magnitude (a value is within 0.1% of what was recorded).
DIGITS = 3

#: The percentiles of a report, by their key in ``latency_ms``.
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9, "p99.99": 99.99}
#: Every key of ``latency_ms``, in the schema's order.
LATENCY_KEYS: tuple[str, ...] = ("min", "mean", *PERCENTILES, "max")


def new_histogram() -> HdrHistogram:
    """An empty histogram of latencies in microseconds, of the one shape every histogram here has."""
    return HdrHistogram(LOWEST, HIGHEST, DIGITS)


def record(h: HdrHistogram, micros: float, count: int = 1) -> None:
    """Record a latency in microseconds, rounded to an integer and clamped to [0, HIGHEST].

    hdrhistogram's own ``record_value`` drops a value past the highest trackable one without a word,
    which would leave the histogram's count short of the calls made; here such a value counts as 60 s.
    """
    h.record_value(min(max(round(micros), 0), HIGHEST), count)


def encode(h: HdrHistogram) -> str:
    """The histogram as the base64 text of its compressed V2 encoding (what a report carries)."""
    blob = h.encode()
    return blob.decode("ascii") if isinstance(blob, bytes) else blob


def decode(s: str | bytes) -> HdrHistogram:
    """The histogram of ``encode``'s text."""
    return HdrHistogram.decode(s.encode("ascii") if isinstance(s, str) else s)


def merge(histograms: Iterable[HdrHistogram]) -> HdrHistogram:
    """A new histogram holding the counts of all of ``histograms`` (which are left unchanged).

    Empty histograms are skipped: hdrhistogram's ``add`` of an empty histogram sets the minimum to 0.
    """
    out = new_histogram()
    for h in histograms:
        if h.get_total_count():
            out.add(h)
    return out


def percentiles(h: HdrHistogram) -> dict[str, float]:
    """``latency_ms`` of the schema: min, mean, p50 ... p99.99 and max in milliseconds; all 0.0 if empty.

    A percentile is the highest value equivalent to the recorded one (within 0.1%), as HdrHistogram
    reports it; the minimum is the lowest equivalent value.
    """
    if not h.get_total_count():
        return dict.fromkeys(LATENCY_KEYS, 0.0)
    at = h.get_percentile_to_value_dict(list(PERCENTILES.values()))
    out = {"min": h.get_min_value() / 1000.0, "mean": h.get_mean_value() / 1000.0}
    out.update({key: at[p] / 1000.0 for key, p in PERCENTILES.items()})
    out["max"] = h.get_max_value() / 1000.0
    return out


def figures(
    h: HdrHistogram,
    ok: int,
    errors: Mapping[str, int],
    failures: Mapping[str, int],
    duration_s: float,
    ops: int | None = None,
) -> dict[str, object]:
    """One "figures" object of the schema for the calls whose latencies ``h`` holds.

    ``errors`` is errno name -> calls, ``failures`` gRPC status name -> calls that failed without an errno;
    ``ops`` the operations the successful calls carried (default: one a call).
    """
    count = h.get_total_count()
    ops = ok if ops is None else ops
    return {
        "count": count,
        "ok": ok,
        "ops": ops,
        "errors": dict(errors),
        "failures": dict(failures),
        "throughput": count / duration_s if duration_s > 0 else 0.0,
        "ops_per_s": ops / duration_s if duration_s > 0 else 0.0,
        "latency_ms": percentiles(h),
        "histogram": encode(h),
    }
