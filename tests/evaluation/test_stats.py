import math

import pytest

from fedsoda_cli.evaluation.stats import wilson_interval


def test_wilson_matches_published_values():
    # Wilson 95 % interval for 81/263 (Newcombe 1998, Table I example): 0.2553 .. 0.3662
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4)
    assert hi == pytest.approx(0.3662, abs=1e-4)


def test_wilson_at_the_edges_stays_in_unit_interval_and_is_not_degenerate():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-4)


def test_wilson_is_symmetric_and_shrinks_with_n():
    lo, hi = wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0)
    assert lo == pytest.approx(0.4038, abs=1e-4)
    lo2, hi2 = wilson_interval(500, 1000)
    assert hi2 - lo2 < hi - lo
    # for large n it approaches (to O(z^2/n)) the normal approximation p +- 1.96 sqrt(p(1-p)/n)
    assert hi2 - 0.5 == pytest.approx(1.959964 * math.sqrt(0.25 / 1000), rel=5e-3)


def test_wilson_no_examples_and_bad_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)
