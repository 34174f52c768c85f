"""The unbiased pass@k estimator against brute-force enumeration and known values, and the k-list checks."""

from __future__ import annotations

import itertools
import math

import pytest

from cipo.evaluation import EvalError, mean_pass_at_k, parse_ks, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_matches_enumeration_over_subsets(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_known_values() -> None:
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)  # pass@1 is the sampled accuracy c/n
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)  # 1 - C(9,5)/C(10,5) = 1 - 126/252
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(16, 2, 4) == pytest.approx(1 - math.comb(14, 4) / math.comb(16, 4))


def test_stable_where_binomials_overflow_floats() -> None:
    n, c, k = 2000, 3, 1000  # C(2000, 1000) ~ 1e600 is no float
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # integer arithmetic, then one division
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert 0.0 <= pass_at_k(2000, 1, 1) <= 1.0


def test_monotone_in_k_and_c() -> None:
    n = 12
    for c in range(n + 1):
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(values, values[1:]))
    for k in range(1, n + 1):
        values = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(values, values[1:]))


def test_mean_over_prompts() -> None:
    assert mean_pass_at_k([0, 4, 16], 16, [1]) == {1: pytest.approx((0 + 0.25 + 1) / 3)}
    with pytest.raises(EvalError):
        mean_pass_at_k([], 16, [1])


def test_bad_arguments() -> None:
    with pytest.raises(EvalError, match="k=17"):
        pass_at_k(16, 3, 17)
    with pytest.raises(EvalError):
        pass_at_k(4, 5, 1)
    with pytest.raises(EvalError):
        pass_at_k(4, 1, 0)


def test_parse_ks() -> None:
    assert parse_ks("1,2,4,8,16", 16) == (1, 2, 4, 8, 16)
    assert parse_ks("4, 1,4", 4) == (1, 4)
    assert parse_ks([2, 1], 2) == (1, 2)
    with pytest.raises(EvalError, match="exceeds -n 8"):
        parse_ks("1,16", 8)
    for bad in ("", "1,,2", "1,a", "0,1", "-1"):
        with pytest.raises(EvalError):
            parse_ks(bad, 16)
    with pytest.raises(EvalError):
        parse_ks([], 16)
    with pytest.raises(EvalError):
        parse_ks("1", 0)
