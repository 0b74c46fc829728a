"""95 % confidence intervals for an accuracy measured on n examples.

We use the Wilson score interval (Wilson 1927), not the normal approximation p +- z*sqrt(p(1-p)/n):
Wilson stays inside [0, 1], is not degenerate at 0/n or n/n, and keeps close to its nominal
coverage on the few hundred examples (and the small test subsets) evaluated here.
"""

from __future__ import annotations

import math

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
