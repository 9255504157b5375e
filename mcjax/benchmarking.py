"""Timing helpers shared by the benchmarks: every timer blocks on the result."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def block(x: Any) -> Any:
    """Wait for every array in a pytree (JAX arrays; torch tensors are synchronous on CPU)."""
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 5) -> dict[str, float]:
    """Time `fn()` (results blocked on) after `warmup` calls; returns seconds statistics."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    arr = np.asarray(times)
    return {"median_s": float(np.median(arr)), "min_s": float(arr.min()),
            "mean_s": float(arr.mean()), "iters": iters}


def time_compile(jitted: Callable, *args, **kwargs) -> float:
    """Seconds to lower and compile `jitted` for these arguments (no execution)."""
    t0 = time.perf_counter()
    jitted.lower(*args, **kwargs).compile()
    return time.perf_counter() - t0


def median(xs) -> float:
    return float(np.median(np.asarray(xs, float)))


def smollm2_135m_config(dtype: str = "float32"):
    """SmolLM2-135M's architecture, for benchmarks with random weights (no model load)."""
    from mcjax.config import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                       rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                       tie_word_embeddings=True, dtype=dtype)
