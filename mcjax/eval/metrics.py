"""Pure metrics of the evaluation (numpy, host side): correlations with explicit handling of
degenerate input, sign agreement, paired ΔNLL statistics against
truncation (`paired_vs_truncation`), and passkey answer scoring.

Degenerate input never turns into a silent NaN: a correlation over fewer than two pairs or
over a constant series is reported as `None` with the reason in `degenerate`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

__all__ = ["pearson", "spearman", "rankdata", "sign_agreement", "correlation_summary",
           "paired_vs_truncation", "PAIRED_NOTE", "PasskeyScore",
           "score_passkey", "accuracy", "PASSKEY_SCORING", "wilson_interval",
           "paired_accuracy", "relevance_ranks"]


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same number of values, got {x.size} and "
                         f"{y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (got NaN or inf)")
    return x, y


def _degenerate(x: np.ndarray, y: np.ndarray) -> str | None:
    if x.size < 2:
        return f"fewer than 2 pairs ({x.size})"
    if np.ptp(x) == 0:
        return "x is constant"
    if np.ptp(y) == 0:
        return "y is constant"
    return None


def pearson(x, y) -> float | None:
    """Pearson correlation of paired values; None when undefined (< 2 pairs or a constant
    series; `correlation_summary` says which)."""
    x, y = _pairs(x, y)
    if _degenerate(x, y):
        return None
    xc, yc = x - x.mean(), y - y.mean()
    r = float(np.dot(xc, yc) / math.sqrt(np.dot(xc, xc) * np.dot(yc, yc)))
    return max(-1.0, min(1.0, r))


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata 'average')."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i: j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None when undefined."""
    x, y = _pairs(x, y)
    if _degenerate(x, y):
        return None
    return pearson(rankdata(x), rankdata(y))


def sign_agreement(x, y) -> tuple[float | None, int]:
    """Share of pairs whose signs agree, over the pairs where both are nonzero, and that
    count. (None, 0) when no pair has two nonzero values."""
    x, y = _pairs(x, y)
    both = (x != 0) & (y != 0)
    n = int(both.sum())
    if n == 0:
        return None, 0
    return float(np.mean(np.sign(x[both]) == np.sign(y[both]))), n


def correlation_summary(x, y) -> dict[str, Any]:
    """Pearson, Spearman and sign agreement of paired values with their counts.

    `degenerate` is None, or why the correlations are None (too few pairs, a constant
    series); `n_sign` counts the pairs with both values nonzero (sign agreement's base).
    """
    x, y = _pairs(x, y)
    agree, n_sign = sign_agreement(x, y)
    return {"n": int(x.size), "pearson": pearson(x, y), "spearman": spearman(x, y),
            "sign_agreement": agree, "n_sign": n_sign, "degenerate": _degenerate(x, y)}


# --------------------------------------------------------------------------- paired ΔNLL

PAIRED_NOTE = (
    "per window i: d_i = NLL_variant,i - NLL_truncation,i (same window, same targets); "
    "mean_diff_vs_truncation = mean(d), se = std(d, ddof=1)/sqrt(n); significant = "
    "mean_diff + 2·se < 0 (the variant beats truncation); delta_nll = mean(NLL_variant - "
    "NLL_full) ± se; gap_recovered = 1 - ΔNLL_variant / ΔNLL_truncation (1: as good as the "
    "full context, 0: no better than dropping the span; None when ΔNLL_truncation <= 0), "
    "its se by the delta method on the paired windows")


def paired_vs_truncation(nll_variant, nll_truncation, nll_full) -> dict[str, Any]:
    """Paired statistics of one variant against truncation over the same windows.

    Inputs are per-window NLLs [n] (each the mean over that window's H targets) of the
    variant, of truncation and of the full context, aligned window by window. Returns n,
    `mean_diff_vs_truncation` and its `se` (of the per-window differences), `significant`
    (mean + 2·se < 0), `delta_nll` / `delta_nll_se` (variant − full), the same for
    truncation, `gap_recovered` = 1 − ΔNLL_variant / ΔNLL_truncation and
    `gap_recovered_se` (delta method: the SE of the mean of the per-window influence
    ((t_i − v_i) − g·(t_i − f_i)) / ΔNLL_truncation). `gap_recovered` is None when
    ΔNLL_truncation <= 0 (no gap to recover; `gap_note` says so). SEs are None for n < 2.
    """
    v = np.asarray(nll_variant, np.float64).ravel()
    t = np.asarray(nll_truncation, np.float64).ravel()
    f = np.asarray(nll_full, np.float64).ravel()
    if not v.size == t.size == f.size:
        raise ValueError(f"per-window NLLs must align: got {v.size}, {t.size}, {f.size}")
    if v.size == 0:
        raise ValueError("paired statistics need at least one window")
    if not (np.isfinite(v).all() and np.isfinite(t).all() and np.isfinite(f).all()):
        raise ValueError("per-window NLLs must be finite (got NaN or inf)")
    n = int(v.size)

    def se(x):
        return float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else None

    d = v - t
    mean_d, se_d = float(d.mean()), se(d)
    dv, dt = v - f, t - f
    gap_v, gap_t = float(dv.mean()), float(dt.mean())
    row: dict[str, Any] = {
        "n": n, "mean_diff_vs_truncation": mean_d, "se": se_d,
        "significant": bool(se_d is not None and mean_d + 2.0 * se_d < 0.0),
        "delta_nll": gap_v, "delta_nll_se": se(dv),
        "delta_nll_truncation": gap_t, "delta_nll_truncation_se": se(dt),
        "gap_recovered": None, "gap_recovered_se": None, "gap_note": None}
    if gap_t > 0.0:
        g = 1.0 - gap_v / gap_t
        row["gap_recovered"] = g
        row["gap_recovered_se"] = se(((t - v) - g * dt) / gap_t)
    else:
        row["gap_note"] = (f"undefined: truncation's ΔNLL is {gap_t:+.4g} <= 0 (dropping the "
                           f"span costs nothing on these windows)")
    return row


# --------------------------------------------------------------------------- passkey

PASSKEY_SCORING = (
    "A case is correct when the key (its exact digit string) occurs in the greedy "
    "continuation as a whole number, i.e. not preceded or followed by another digit "
    "(regex (?<!\\d)KEY(?!\\d) on the decoded text). Digit accuracy: the first run of digits "
    "in the continuation is the prediction; the share of the key's digits it matches "
    "position by position (0 when the continuation holds no digit).")


@dataclasses.dataclass(frozen=True)
class PasskeyScore:
    found: bool  # the key occurs as a whole number in the continuation
    predicted: str  # first run of digits in the continuation ("" if none)
    digits_correct: int  # positions i < len(key) with predicted[i] == key[i]
    digit_accuracy: float  # digits_correct / len(key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def score_passkey(continuation: str, key: str) -> PasskeyScore:
    """Score one greedy continuation against the passkey (see `PASSKEY_SCORING`)."""
    if not key or not key.isdigit():
        raise ValueError(f"a passkey is a non-empty digit string, got {key!r}")
    found = re.search(rf"(?<!\d){re.escape(key)}(?!\d)", continuation) is not None
    m = re.search(r"\d+", continuation)
    predicted = m.group(0) if m else ""
    correct = sum(1 for a, b in zip(predicted, key) if a == b)
    return PasskeyScore(found=found, predicted=predicted, digits_correct=correct,
                        digit_accuracy=correct / len(key))


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (95 % by default); None for n = 0."""
    if n <= 0:
        return None
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie in [0, n={n}]")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy(scores: Sequence[PasskeyScore]) -> dict[str, Any]:
    """Accuracy (share found) with its Wilson 95 % interval, and mean digit accuracy."""
    n = len(scores)
    if n == 0:
        return {"accuracy": None, "digit_accuracy": None, "correct": 0, "n": 0, "ci95": None}
    correct = sum(s.found for s in scores)
    return {"accuracy": correct / n, "ci95": list(wilson_interval(int(correct), n)),
            "digit_accuracy": float(np.mean([s.digit_accuracy for s in scores])),
            "correct": int(correct), "n": n}


def focus_recall(runs: Sequence[Sequence[int]], occurrences: Sequence[Sequence[int]]
                 ) -> bool:
    """Whether some occurrence of the answer — its history positions, one array per
    occurrence — lies wholly in raw tokens (LOD0) of the working context whose runs are
    `runs` ((level, first token, end token, entries), as `working_context.focus_runs`
    gives them): what focus has to achieve before the reader can answer (SPEC §2.9).
    False when there is no non-empty occurrence."""
    def raw(pos) -> bool:
        pos = np.asarray(pos, np.int64)
        inside = np.zeros(pos.shape, bool)
        for level, start, end, _ in runs:
            if level == 0:
                inside |= (pos >= start) & (pos < end)
        return pos.size > 0 and bool(inside.all())

    return any(raw(p) for p in occurrences)


def relevance_ranks(relevance, blocks: Sequence[int]) -> list[int]:
    """1-based rank of each of `blocks` among all blocks by `relevance` [n] (highest first):
    1 + the number of blocks strictly more relevant (ties share the better rank; a block
    that cannot be scored, -inf, ranks after every scored one)."""
    rel = np.asarray(relevance, np.float64).ravel()
    return [1 + int(np.sum(rel > rel[int(b)])) for b in blocks]


def paired_accuracy(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Two methods scored on the same cases (same order): counts right by both / only a /
    only b, the mean paired difference a − b with its standard error, and the exact
    two-sided McNemar (sign-test) p-value over the discordant cases."""
    x, y = np.asarray(a, bool), np.asarray(b, bool)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need two equally long non-empty case lists, got {x.shape} and "
                         f"{y.shape}")
    d = x.astype(float) - y.astype(float)
    n = len(d)
    only_a, only_b = int(np.sum(x & ~y)), int(np.sum(~x & y))
    k, m = min(only_a, only_b), only_a + only_b
    # P(X <= k) for X ~ Binomial(m, 1/2), doubled (capped at 1)
    p = 1.0 if m == 0 else min(1.0, 2.0 * sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m)
    se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "both": int(np.sum(x & y)), "only_a": only_a, "only_b": only_b,
            "neither": int(np.sum(~x & ~y)), "mean_diff": float(d.mean()), "se": se,
            "mcnemar_p": p}
