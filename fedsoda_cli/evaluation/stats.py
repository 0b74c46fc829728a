"""95 % confidence intervals for an accuracy measured on n examples, and for the difference of
two accuracies measured on the same n examples.

We use the Wilson score interval (Wilson 1927), not the normal approximation p +- z*sqrt(p(1-p)/n):
Wilson stays inside [0, 1], is not degenerate at 0/n or n/n, and keeps close to its nominal
coverage on the few hundred examples (and the small test subsets) evaluated here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(correct: int, count: int, z: float = Z95) -> tuple[float, float]:
    """(lo, hi) of the Wilson score interval for `correct` successes out of `count` trials.

    `count` 0 gives (0.0, 1.0): nothing was measured, every accuracy is possible.
    """
    if count < 0 or not 0 <= correct <= count:
        raise ValueError(f"need 0 <= correct <= count, got correct={correct}, count={count}")
    if count == 0:
        return 0.0, 1.0
    p = correct / count
    z2 = z * z
    centre = (p + z2 / (2 * count)) / (1 + z2 / count)
    half = z / (1 + z2 / count) * math.sqrt(p * (1 - p) / count + z2 / (4 * count * count))
    # at 0/n and n/n the bound is exactly 0 or 1; say so rather than trust the rounding
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == count else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A minus accuracy of B on the same examples, from the 2x2 table of who was right.

    `ci95`: Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10),
    built from the two Wilson intervals and the correlation of A's and B's outcomes. Two targets
    scored on the same examples are strongly correlated, so this interval is far narrower than what
    comparing their two separate intervals suggests; whether those overlap is not the test.
    `p_mcnemar`: the exact (binomial) two-sided McNemar test on the discordant examples.
    """

    count: int
    both: int  # right in both
    only_a: int  # right in A only
    only_b: int  # right in B only
    difference: float
    ci95: tuple[float, float]
    p_mcnemar: float

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "both": self.both,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "difference": self.difference,
            "ci95": list(self.ci95),
            "p_mcnemar": self.p_mcnemar,
        }


def paired_difference(correct_a: Sequence[bool], correct_b: Sequence[bool], z: float = Z95) -> PairedDifference:
    """A's accuracy minus B's on the same examples (`correct_a[i]`, `correct_b[i]`: example i)."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired outcomes need the same examples, got {len(correct_a)} and {len(correct_b)}")
    n = len(correct_a)
    a = sum(1 for x, y in zip(correct_a, correct_b) if x and y)
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    d = n - a - b - c
    if n == 0:
        return PairedDifference(0, 0, 0, 0, 0.0, (-1.0, 1.0), 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    # Newcombe's phi: the outcome correlation, its positive part reduced by n/2 (his continuity step)
    cross = a * d - b * c
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(denominator) if denominator else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return PairedDifference(
        n, a, b, c, difference, (max(-1.0, difference - below), min(1.0, difference + above)), mcnemar_exact(b, c)
    )


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: under "A and B are equally good" each discordant example is a fair
    coin, so the smaller count is Binomial(only_a + only_b, 1/2)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(only_a, only_b) + 1)) / 2**m
    return min(1.0, 2 * tail)
