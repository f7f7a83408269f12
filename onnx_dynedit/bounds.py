"""What a count of inputs can vouch for: the exact one-sided upper confidence limit of a
rate seen k times in n draws (Clopper-Pearson), for the degradation report
(``RectifyResult.degradation_bound``, ``degradation.bound_line``) and ``dynedit verify``'s clean figures."""

from __future__ import annotations

import math

CONFIDENCE = 0.95  # of ``upper_bound``


def upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided exact (Clopper-Pearson) upper confidence limit of a rate seen ``k``
    times in ``n`` draws: the p at which k or fewer would be seen with probability
    1 - ``confidence`` (1.0 when k >= n or n is 0). Bisection on the binomial CDF."""
    if n <= 0 or k >= n:
        return 1.0
    alpha = 1.0 - confidence
    if k <= 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = k / n, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) > alpha else (lo, mid)
    return hi


def inputs_needed(rate: float, confidence: float = CONFIDENCE) -> int:
    """How many inputs, none of them turned, vouch at ``confidence`` for a share of at most
    ``rate`` (0 < rate < 1): the smallest n with ``upper_bound(0, n)`` <= rate, i.e.
    (1 - rate)^n <= 1 - confidence (1 %: 299 inputs)."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-rate))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1, summed in log space."""
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs)
