"""Reference for the sampling distribution: temperature, top-k and top-p (nucleus) in float64, by sorting.

p(v) ∝ exp(z_v / T) over the kept tokens: the k largest (ties at the k-th value kept), then the smallest
prefix of the remaining tokens, in decreasing probability, whose mass reaches top_p (Holtzman et al. 2020).
"""

from __future__ import annotations

import math


def sampling_distribution(
    logits_V: list[float], *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> list[float]:
    """The distribution SamplingParams(temperature, top_k, top_p) samples from, over the V tokens."""
    z = [v / temperature for v in logits_V]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    kept = set(order)
    if top_k and top_k < len(z):
        kth = z[order[top_k - 1]]
        kept = {i for i in order if z[i] >= kth}
    if top_p < 1.0:
        m = max(z[i] for i in kept)
        w = {i: math.exp(z[i] - m) for i in kept}
        total = math.fsum(w.values())
        nucleus, mass = set(), 0.0
        for i in (i for i in order if i in kept):
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += w[i] / total
        kept = nucleus
    m = max(z[i] for i in kept)
    w = [math.exp(z[i] - m) if i in kept else 0.0 for i in range(len(z))]
    total = math.fsum(w)
    return [x / total for x in w]
