"""Summary statistics shared by training (held-out checks) and evaluation (numpy, host side)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["mean_stderr"]


def mean_stderr(values) -> dict[str, Any]:
    """Mean and standard error of the mean (sample std / √n; None for n < 2)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return {"mean": None, "stderr": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "stderr": se, "n": int(v.size)}
