"""GistNet (SPEC §2.2): shapes, dependence on every child, order sensitivity, levels,
batching, compilation, gradients and input validation. Tiny, mutually distinct dims."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.config import ConfigError, GistConfig
from mcjax.gist import GistInputError, _gist_blocks, gist_blocks, init_gist_params, num_params

D = 44  # base width (tiny Llama)
K = 32  # block size
POOLINGS = ("mean", "query", "cls")
HEADS = POOLINGS + ("mlp",)  # "mlp": GistConfig(head="mlp"), mean of children -> MLPs
N = K + 1  # most tests use this batch size, so each pooling compiles once for them
BASE_CFG = GistConfig(width=36, num_heads=3, num_layers=2, mlp_ratio=2, pooling="query")


def cfg_for(pooling: str) -> GistConfig:
    if pooling == "mlp":
        return dataclasses.replace(BASE_CFG, head="mlp")
    return dataclasses.replace(BASE_CFG, pooling=pooling)


@functools.lru_cache(maxsize=None)
def params_for(pooling: str):
    return init_gist_params(cfg_for(pooling), D, jax.random.PRNGKey(7))


def children(n: int, seed: int = 0, k: int = K) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, k, D)), np.float32)


def assert_rows_differ(out: np.ndarray, ref: np.ndarray, what: str) -> None:
    diff = np.abs(out - ref).max(axis=-1)
    bad = np.nonzero(diff <= 1e-6)[0]
    assert bad.size == 0, f"{what}: output unchanged for rows {bad.tolist()} (max diffs {diff})"


@pytest.mark.parametrize("pooling", HEADS)
def test_gist_blocks_maps_n_blocks_to_n_base_width_vectors(pooling):
    x = children(N)
    out = gist_blocks(params_for(pooling), cfg_for(pooling), x, 1)
    chex.assert_shape(out, (N, D))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    # Distinct blocks give distinct gists, and no gist is (near) zero.
    assert np.all(np.linalg.norm(np.asarray(out), axis=-1) > 1e-3)
    assert np.abs(np.asarray(out)[0] - np.asarray(out)[1]).max() > 1e-4


@pytest.mark.parametrize("pooling", HEADS)
def test_each_pooling_head_depends_on_every_child(pooling):
    """Changing any single child (of 32) changes the gist — CLS included."""
    x = children(1, seed=1)[0]
    batch = np.repeat(x[None], K + 1, axis=0)  # row K is the unmodified block
    for i in range(K):
        batch[i, i] += np.asarray(jax.random.normal(jax.random.PRNGKey(100 + i), (D,)))
    out = np.asarray(gist_blocks(params_for(pooling), cfg_for(pooling), batch, 1))
    assert_rows_differ(out[:K], np.broadcast_to(out[K], (K, D)), f"{pooling}: change child i")


@pytest.mark.parametrize("pooling", POOLINGS)
def test_gists_change_when_two_children_swap(pooling):
    """Children carry RoPE positions, so the block is a sequence, not a set."""
    x = children(1, seed=2)[0]
    pairs = [(i, (3 * i + 1) % K) for i in range(K - 1)] + [(0, K - 1)]  # 2i+1 is odd: i != j
    assert all(i != j for i, j in pairs) and len(pairs) == N - 1
    batch = np.repeat(x[None], N, axis=0)
    for r, (i, j) in enumerate(pairs):
        batch[r, [i, j]] = batch[r, [j, i]]
    out = np.asarray(gist_blocks(params_for(pooling), cfg_for(pooling), batch, 1))
    assert_rows_differ(out[:-1], np.broadcast_to(out[-1], (len(pairs), D)),
                       f"{pooling}: swap children")


@pytest.mark.parametrize("pooling", HEADS)
def test_blocks_in_one_batch_do_not_interact(pooling):
    x = children(N, seed=3)
    y = x.copy()
    y[0] += 1.0  # change block 0 only
    a = np.asarray(gist_blocks(params_for(pooling), cfg_for(pooling), x, 1))
    b = np.asarray(gist_blocks(params_for(pooling), cfg_for(pooling), y, 1))
    assert np.abs(a[0] - b[0]).max() > 1e-5
    np.testing.assert_array_equal(a[1:], b[1:])


def test_mlp_head_is_a_function_of_the_children_mean():
    """The mlp head pools first: permuting children, or any two blocks with the same mean,
    give the same gist (what it trades for size and speed; the read-pass hidden states it
    is meant for are already contextual)."""
    x = children(2, seed=11)
    y = x.copy()
    y[0] = x[0][::-1]  # same children, reversed order
    p, c = params_for("mlp"), cfg_for("mlp")
    np.testing.assert_allclose(np.asarray(gist_blocks(p, c, x, 1)),
                               np.asarray(gist_blocks(p, c, y, 1)), rtol=1e-5, atol=1e-6)


def test_level_embedding_changes_the_gist_and_level_may_vary_per_block():
    p, c = params_for("query"), cfg_for("query")
    x = children(N, seed=4)
    g1 = np.asarray(gist_blocks(p, c, x, 1))
    g2 = np.asarray(gist_blocks(p, c, x, 2))
    assert_rows_differ(g1, g2, "level 1 vs 2")
    levels = np.arange(N, dtype=np.int32) % 2 + 1  # 1, 2, 1, 2, ...
    mixed = np.asarray(gist_blocks(p, c, x, levels))
    chex.assert_trees_all_close(mixed[levels == 1], g1[levels == 1], atol=1e-6)
    chex.assert_trees_all_close(mixed[levels == 2], g2[levels == 2], atol=1e-6)


def test_gist_blocks_compiles_once_per_shape_for_every_level():
    p, c = params_for("mean"), cfg_for("mean")
    x = children(N, seed=5)
    gist_blocks(p, c, x, 1)  # ensure compiled
    before = _gist_blocks._cache_size()
    for level in (1, 2, 3, 4, 2, 1):
        gist_blocks(p, c, x, level)
    gist_blocks(p, c, jnp.asarray(x) + 1.0, np.int32(2))
    assert _gist_blocks._cache_size() == before
    gist_blocks(p, c, children(7, seed=5), 1)  # a new shape compiles once more
    assert _gist_blocks._cache_size() == before + 1


def test_block_size_is_taken_from_the_input():
    """The weights do not depend on K: the same params gist blocks of 5 children."""
    out = gist_blocks(params_for("cls"), cfg_for("cls"), children(3, seed=6, k=5), 1)
    chex.assert_shape(out, (3, D))
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("pooling", HEADS)
def test_every_parameter_receives_gradient(pooling):
    """Training must reach every weight (the PyTorch reference never trained GistNet)."""
    p, c = params_for(pooling), cfg_for(pooling)
    x = children(2, seed=8)
    target = jnp.asarray(children(1, seed=9)[0, :2])

    def loss(params):
        return jnp.mean((gist_blocks(params, c, x, 1) - target) ** 2)

    grads = jax.grad(loss)(p)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = [jax.tree_util.keystr(k) for k, g in flat
            if not np.any(np.asarray(g) != 0) and "level_embed" not in jax.tree_util.keystr(k)]
    assert not zero, f"parameters with zero gradient: {zero}"
    # Level embedding: only the row of the level used gets gradient.
    lev = np.asarray(grads["level_embed"]["embedding"])
    assert np.any(lev[0] != 0) and not np.any(lev[1:] != 0)
    assert num_params(p) > 0


def test_gist_blocks_runs_inside_a_jitted_step_with_traced_params_and_level():
    p, c = params_for("query"), cfg_for("query")
    x = children(3, seed=11)
    step = jax.jit(lambda params, xs, lv: gist_blocks(params, c, xs, lv))
    chex.assert_trees_all_close(step(p, x, jnp.int32(2)), gist_blocks(p, c, x, 2), atol=1e-6)


def test_output_rms_sets_the_initial_gist_scale():
    x = children(N, seed=12)
    for rms in (0.05, 1.0):
        p = init_gist_params(cfg_for("mean"), D, jax.random.PRNGKey(3), output_rms=rms)
        out = np.asarray(gist_blocks(p, cfg_for("mean"), x, 1))
        assert 0.5 * rms < np.sqrt(np.mean(out ** 2)) < 2.0 * rms


def test_bf16_compute_stays_close_to_fp32():
    c32 = cfg_for("query")
    c16 = dataclasses.replace(c32, dtype="bfloat16")
    x = children(3, seed=10)
    a = np.asarray(gist_blocks(params_for("query"), c32, x, 1))
    b = np.asarray(gist_blocks(params_for("query"), c16, x, 1))
    chex.assert_type(b, jnp.float32)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((K, D), np.float32), r"shape \[N, K, D\]"),
    (np.zeros((2, K, D + 1), np.float32), "width 45"),
    (np.zeros((0, K, D), np.float32), "at least one block"),
    (np.zeros((2, K, D), np.int32), "floating point"),
])
def test_gist_blocks_rejects_malformed_children(bad, match):
    with pytest.raises(GistInputError, match=match):
        gist_blocks(params_for("mean"), cfg_for("mean"), bad, 1)


@pytest.mark.parametrize("level", [0, 5, -1, np.array([1, 2, 3], np.int32), 1.5])
def test_gist_blocks_rejects_out_of_range_levels(level):
    with pytest.raises(GistInputError, match="level"):
        gist_blocks(params_for("mean"), cfg_for("mean"), children(2), level)


def test_gist_config_rejects_bad_settings():
    with pytest.raises(ConfigError):
        GistConfig(pooling="max")
    with pytest.raises(ConfigError):
        GistConfig(max_level=0)
