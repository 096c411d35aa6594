"""Evaluation statistics against hand-built cases: python -m pytest -q tests/test_eval.py"""
import math

import pytest

import eval as evaluation


def test_win_rate_hand_built_with_ties():
    ours = [3.0, 1.0, 2.0, 5.0, 0.5]
    base = [1.0, 1.0, 4.0, 2.0, 0.5]  # win, tie, loss, win, tie
    rate, lo, hi, n = evaluation.win_rate(ours, base)
    assert n == 5
    assert rate == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    outcomes = [1, 0.5, 0, 1, 0.5]
    var = sum((o - 0.6) ** 2 for o in outcomes) / 5
    assert hi - rate == pytest.approx(1.96 * math.sqrt(var / 5))
    assert lo == pytest.approx(rate - (hi - rate))


def test_ci_matches_binomial_wald_interval():
    # 70 wins out of 100, no ties: the textbook interval p +- 1.96 sqrt(p (1 - p) / n)
    rate, lo, hi, n = evaluation.win_rate([1.0] * 70 + [0.0] * 30, [0.5] * 100)
    assert (rate, n) == (0.7, 100)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 100)
    assert lo == pytest.approx(0.7 - half) and hi == pytest.approx(0.7 + half)
    assert lo == pytest.approx(0.6102, abs=1e-4)


def test_all_ties_is_half_and_interval_clipped():
    assert evaluation.win_rate([1.0] * 4, [1.0] * 4)[:3] == (0.5, 0.5, 0.5)
    rate, lo, hi, _ = evaluation.win_rate([2.0] * 3, [1.0] * 3)
    assert (rate, lo, hi) == (1.0, 1.0, 1.0)
