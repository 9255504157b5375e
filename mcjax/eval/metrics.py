"""Pure metrics of the evaluation (numpy, host side): correlations with explicit handling of
degenerate input, sign agreement, mean ± standard error, and passkey answer scoring.

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
           "mean_stderr", "PasskeyScore", "score_passkey", "accuracy", "PASSKEY_SCORING"]


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


def mean_stderr(values) -> dict[str, Any]:
    """Mean and standard error of the mean (sample std / √n; None for n < 2)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return {"mean": None, "stderr": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "stderr": se, "n": int(v.size)}


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


def accuracy(scores: Sequence[PasskeyScore]) -> dict[str, Any]:
    """Accuracy (share found) and mean digit accuracy over cases."""
    n = len(scores)
    if n == 0:
        return {"accuracy": None, "digit_accuracy": None, "correct": 0, "n": 0}
    correct = sum(s.found for s in scores)
    return {"accuracy": correct / n,
            "digit_accuracy": float(np.mean([s.digit_accuracy for s in scores])),
            "correct": int(correct), "n": n}
