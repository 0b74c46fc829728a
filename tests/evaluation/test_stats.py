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


def test_paired_difference_counts_the_table_and_mcnemar_is_the_exact_binomial():
    from fedsoda_cli.evaluation.stats import paired_difference

    # 10 examples only A gets right, 2 only B, 80 both, 8 neither
    a = [True] * 10 + [False] * 2 + [True] * 80 + [False] * 8
    b = [False] * 10 + [True] * 2 + [True] * 80 + [False] * 8
    paired = paired_difference(a, b)
    assert (paired.count, paired.both, paired.only_a, paired.only_b) == (100, 80, 10, 2)
    assert paired.difference == pytest.approx(0.08)
    assert paired.p_mcnemar == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 P(X <= 2), X ~ Bin(12, 1/2)
    lo, hi = paired.ci95
    assert lo < 0.08 < hi and lo > 0  # significant, as McNemar says
    # swapping A and B mirrors the interval
    mirrored = paired_difference(b, a)
    assert mirrored.ci95 == pytest.approx((-hi, -lo)) and mirrored.p_mcnemar == paired.p_mcnemar


def test_pairing_narrows_the_interval_that_two_separate_intervals_would_suggest():
    from fedsoda_cli.evaluation.stats import paired_difference, wilson_interval

    # 872 examples, A right on 700, B on 685, and they agree on all but 25 (the same model, a little trained)
    a = [True] * 685 + [True] * 15 + [False] * 0 + [False] * 172
    b = [True] * 685 + [False] * 15 + [False] * 0 + [False] * 172
    lo_a, hi_a = wilson_interval(700, 872)
    lo_b, hi_b = wilson_interval(685, 872)
    assert lo_a < hi_b  # the two separate intervals overlap...
    paired = paired_difference(a, b)
    assert paired.ci95[0] > 0 and paired.p_mcnemar < 1e-3  # ...yet the paired difference is clearly positive
    assert paired.ci95[1] - paired.ci95[0] < (hi_a - lo_a) / 2


def test_paired_difference_without_discordant_examples_is_zero_and_p_one():
    from fedsoda_cli.evaluation.stats import paired_difference

    paired = paired_difference([True, False, True], [True, False, True])
    assert paired.difference == 0 and paired.p_mcnemar == 1.0 and paired.ci95[0] <= 0 <= paired.ci95[1]
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([True], [True, False])
