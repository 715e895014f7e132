"""Goodness-of-fit helpers for the statistical tests (standard library only).

A test that draws n samples from a distribution it claims is p0 bins the counts (bins with expected
count < 5 merged), computes Pearson's X² = Σ (O − E)² / E and rejects at level α when X² exceeds the
χ²(df) quantile 1 − α. Under an alternative p1 the statistic is approximately noncentral χ²(df, λ) with
λ = n · Σ (p1 − p0)² / p0 (n times the χ² distance), which is how the tests choose n for a stated power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

MIN_EXPECTED = 5.0  # Pearson's rule of thumb for the χ² approximation


def chi2_quantile(df: int, upper_tail: float) -> float:
    """x with P(χ²(df) > x) = upper_tail, by the Wilson–Hilferty cube-root normal approximation."""
    z = NormalDist().inv_cdf(1.0 - upper_tail)
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def noncentral_power(df: int, noncentrality: float, upper_tail: float) -> float:
    """P(noncentral χ²(df, λ) > the level-``upper_tail`` critical value), by Patnaik's scaled-χ² approximation."""
    k, lam = df, noncentrality
    scale = (k + 2 * lam) / (k + lam)
    dof = (k + lam) ** 2 / (k + 2 * lam)
    critical = chi2_quantile(df, upper_tail)
    # P(scale · χ²(dof) > critical) via Wilson–Hilferty on χ²(dof)
    x = critical / scale
    c = 2.0 / (9.0 * dof)
    z = ((x / dof) ** (1 / 3) - (1 - c)) / math.sqrt(c)
    return 1.0 - NormalDist().cdf(z)


def merged_bins(expected_counts: list[float]) -> list[list[int]]:
    """Indices grouped so every group expects >= MIN_EXPECTED counts (rare categories pooled, in order)."""
    order = sorted(range(len(expected_counts)), key=lambda i: -expected_counts[i])
    groups: list[list[int]] = []
    pool: list[int] = []
    pooled = 0.0
    for i in order:
        if expected_counts[i] >= MIN_EXPECTED:
            groups.append([i])
        else:
            pool.append(i)
            pooled += expected_counts[i]
    if pool:
        if pooled >= MIN_EXPECTED or not groups:
            groups.append(pool)
        else:
            groups[-1].extend(pool)
    return groups


@dataclass
class ChiSquare:
    statistic: float
    df: int
    critical: float

    @property
    def rejects(self) -> bool:
        return self.statistic > self.critical


def chi_square_test(counts: list[int], probs: list[float], *, upper_tail: float) -> ChiSquare:
    """Pearson's goodness-of-fit of ``counts`` against ``probs`` (bins merged so each expects >= 5)."""
    n = sum(counts)
    expected = [n * p for p in probs]
    groups = merged_bins(expected)
    stat = 0.0
    for g in groups:
        o = sum(counts[i] for i in g)
        e = sum(expected[i] for i in g)
        stat += (o - e) ** 2 / e
    df = len(groups) - 1
    return ChiSquare(stat, df, chi2_quantile(df, upper_tail))


def chi2_distance(p1: list[float], p0: list[float], groups: list[list[int]]) -> float:
    """Σ_g (p1_g − p0_g)² / p0_g over merged bins: λ / n for the noncentral χ² of the binned test."""
    total = 0.0
    for g in groups:
        a = sum(p1[i] for i in g)
        b = sum(p0[i] for i in g)
        total += (a - b) ** 2 / b
    return total
