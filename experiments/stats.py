"""The statistics over seeds every table uses: mean ± sample std, and paired differences with a 95% interval.

A seed is one draw of everything random (the world, the base, the fine-tune), so seeds are the samples:
- the spread is the sample std (n - 1), the estimate of how far another seed would land;
- a comparison of two modes is paired per seed (both come from the same base), and its 95% interval is
  Student's t interval of the mean difference. Only where that interval excludes zero do the docs say one
  mode beats another; otherwise "no detectable difference".
Plain Python on purpose: tools/report.py writes the docs' tables with it, without torch or scipy.
"""
import math
import statistics


class DataError(ValueError):
    """Points that cannot make the table asked of them (a missing point, sweep or seed, or too few seeds):
    tools/report.py says it in one line, where any other error is our bug and a traceback."""


# t_{0.975, df}: the two-sided 95% quantile of Student's t for df = 1 .. 30 (from any t table; scipy's
# t.ppf(0.975, df) gives the same to three decimals). Above 30, t_quantile's series is as close.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval with df degrees of freedom."""
    if df < 1:
        raise DataError("a t interval needs at least two samples")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile (Abramowitz & Stegun 26.7.5)
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def std(values: list[float]) -> float:
    """Sample std (n - 1); 0 for a single value, which has no spread to estimate."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def interval(diffs: list[float]) -> tuple[float, float]:
    """95% t interval of the mean of diffs: mean ± t * s / sqrt(n)."""
    half = t_quantile(len(diffs) - 1) * std(diffs) / math.sqrt(len(diffs))
    mean = statistics.mean(diffs)
    return mean - half, mean + half


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):5.1f} ± {std(values):4.1f}"


def paired(a: list[float], b: list[float]) -> str:
    """a - b per seed: the mean, its 95% interval, and in how many seeds a is ahead (ties count as not)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    ahead = f"({sum(d > 0 for d in diffs)}/{len(diffs)})"
    if len(diffs) < 2:
        return f"{diffs[0]:+5.1f} {ahead}"
    low, high = interval(diffs)
    return f"{statistics.mean(diffs):+5.1f} [{low:+.1f}, {high:+.1f}] {ahead}"


def detectable(a: list[float], b: list[float]) -> bool:
    """Whether the 95% interval of a - b excludes zero: the only case where the docs may say "beats"."""
    low, high = interval([x - y for x, y in zip(a, b, strict=True)])
    return low > 0 or high < 0


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, then one line per row (every table the docs generate)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])
