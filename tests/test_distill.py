"""LensNet v2 by distillation (`mcjax.train.distill`, experiments/distill_lens.py): the
teacher's targets, the recorded states, and that training fits them."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcjax import focus, lens, retrieval
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.config import get_config, override
from mcjax.gist import init_gist_params
from mcjax.train import distill, loop
from mcjax.train import steps as train_steps
from mcjax.tree import BlockGister, MegaContextTree

CFG = override(get_config("tiny"), {"lens.query_tokens": 3, "lens.query_layer": 2,
                                    "lens.retrieval_features": True})
LLAMA, MC, K = CFG.base_config, CFG.mc, CFG.mc.block_size
ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def params():
    return base.init_params(LLAMA, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def states_of_history():
    g = init_gist_params(CFG.gist, LLAMA.hidden_size, jax.random.key(1), block_size=K)
    gister = BlockGister.from_base(CFG.gist, g, params(), LLAMA, block_size=K,
                                   retrieval=CFG.retrieval)
    keys = retrieval.BlockKeys(CFG.retrieval, LLAMA, K)
    tree = MegaContextTree.in_memory(MC, gister, view_capacity_tokens=2048, block_keys=keys)
    ids = np.random.default_rng(4).integers(3, LLAMA.vocab_size, 1600)
    tree.append(ids)
    view = tree.view()
    needle = [7, 8]  # inside the oldest LOD1/LOD2 spans of the initial layout
    states = distill.distill_states(params(), view, CFG, needle, rounds=4,
                                    rng=np.random.default_rng(0), explore=0.0)
    return view, needle, states


def test_first_state_is_the_initial_layout_with_the_teachers_slot_scores():
    view, needle, states = states_of_history()
    s0 = states[0]
    assert set(s0) == set(distill.STATE_FIELDS)
    wc = wcm.initial_layout(1600, MC)
    np.testing.assert_array_equal(s0["level"], wc.level)
    np.testing.assert_array_equal(s0["node"], wc.node)
    # the teacher, computed independently: retrieval block scores with the needle raised
    read = retrieval.tail_read(params(), LLAMA, CFG.retrieval, view.tokens, view.counts[0],
                               hidden_layer=2, hidden_tokens=3)
    rel, ok = retrieval.block_relevance(view.keys, view.counts[0], read["queries"],
                                        read["query_valid"], CFG.retrieval, MC, LLAMA)
    blocks = np.asarray(retrieval.block_scores(rel, ok, CFG.retrieval))
    teacher = blocks.copy()
    teacher[needle] = 1.0
    np.testing.assert_allclose(s0["target"], retrieval.slot_scores(wc, jnp.asarray(teacher), MC),
                               atol=1e-6)
    np.testing.assert_allclose(s0["slot_retrieval"], retrieval.slot_retrieval_features(
        wc, rel, jnp.asarray(blocks), MC), atol=1e-5)
    np.testing.assert_allclose(s0["query_hidden"], read["hidden"], atol=1e-2)  # fp16 stored
    emb = wcm.materialize(wc, view, params(), MC)[0]
    np.testing.assert_allclose(s0["slot_embeds"], emb, atol=2e-2, rtol=1e-2)
    # the needle mask: slots whose span holds block 7 or 8 (hand-computed from the entries)
    for i, (level, node, *_r) in enumerate(wcm.to_entries(wc)):
        lo, hi = node * K ** level, (node + 1) * K ** level
        holds = any(lo < (b + 1) * K and b * K < hi for b in needle)
        assert bool(s0["needle"][i]) == holds, (i, level, node)
    assert s0["target"][s0["needle"] & (s0["level"] >= 1)].max() == pytest.approx(1.0)


def test_states_follow_the_teacher_through_the_allocator_until_the_needle_is_raw():
    """With explore=0 each state is the allocator's move on the teacher's scores of the
    last one, unless that move is a no-op (then a random move, so states differ)."""
    _, _, states = states_of_history()
    assert 2 <= len(states) <= 5
    teacher_moves = 0
    for a, b in zip(states, states[1:]):
        wc = wcm.WorkingContext(**{f: jnp.asarray(a[f]) for f in (
            "level", "node", "valid", "edit_step", "edit_dir", "num_tokens", "step")})
        moved, _ = focus.allocate(wc, jnp.asarray(a["target"]), MC)
        if np.array_equal(moved.level, a["level"]) and np.array_equal(moved.node, a["node"]):
            continue  # the teacher is done: an exploring move
        np.testing.assert_array_equal(moved.level, b["level"])
        np.testing.assert_array_equal(moved.node, b["node"])
        teacher_moves += 1
    assert teacher_moves >= 1
    assert any(not np.any(s["needle"] & (s["level"] >= 1) & s["valid"]) for s in states), \
        "the needle's blocks become raw tokens"
    assert np.any(states[0]["needle"] & (states[0]["level"] >= 1))


def _fit(cfg, batch, steps):
    """Eval metrics of a fresh LensNet before and after `steps` Adam updates on `batch`
    (the training loop's `DistillStep`)."""
    p = lens.init_lens(cfg.lens, cfg.mc, cfg.base_config.hidden_size, jax.random.key(0))
    opt = optax.adam(3e-3)
    step = train_steps.DistillStep(cfg.lens, cfg.mc)
    update = jax.jit(lambda st, b: step.update(opt, st, None, b, None))
    evaluate = jax.jit(lambda p, b: step.evaluate(p, None, b))
    st = train_steps.init_state({"lens": p}, opt)
    first = jax.device_get(evaluate(st.params, batch))
    for _ in range(steps):
        st, _ = update(st, batch)
    return first, jax.device_get(evaluate(st.params, batch))


def test_training_fits_the_teacher_and_metrics_count_what_they_claim():
    _, _, states = states_of_history()
    arrays = distill.stack_states(states)
    batch = distill.batch_from_states(arrays)
    first, last = _fit(CFG, batch, 60)
    assert last["mse"] < 0.3 * first["mse"]
    assert last["n_needle"] == sum(bool(np.any(s["needle"] & (s["level"] >= 1))) for s in states)
    # the metrics on the teacher's own scores: perfect agreement, no false expansions
    perfect = distill.distill_metrics(batch.target, batch, MC)
    assert float(perfect["mse"]) == 0.0 and float(perfect["false_expand"]) == 0.0
    assert float(perfect["best_agree"]) == 1.0 and float(perfect["needle_expand"]) == 1.0


def _rows(n):
    return {"target": np.arange(n)}


def test_state_batches_cover_every_row_each_epoch_and_resume_where_they_were():
    it = distill.StateBatches(_rows(10), 4, seed=0)
    seen = np.concatenate([it.next_indices(), it.next_indices()])
    chex.assert_shape(seen, (8,))
    assert len(set(seen.tolist())) == 8
    small = distill.StateBatches(_rows(3), 4).next_indices()
    assert sorted(set(small.tolist())) == [0, 1, 2]
    with pytest.raises(ValueError):
        distill.StateBatches(_rows(0), 4)
    # the position is plain data: a restored iterator continues with the same batches
    saved = it.state()
    ahead = [it.next_indices().tolist() for _ in range(3)]  # crosses into the next epoch
    again = distill.StateBatches(_rows(10), 4, seed=0)
    again.restore(saved)
    assert [again.next_indices().tolist() for _ in range(3)] == ahead
    # held-out batches hold every row, in order, in batches of one shape
    val = distill.eval_batches(distill.stack_states(states_of_history()[2]), 2)
    n = len(states_of_history()[2])
    assert all(b.target.shape[0] == 2 for b in val) and len(val) == -(-n // 2)


def test_distillation_runs_through_the_training_loop_and_resumes_exactly(tmp_path):
    _, _, states = states_of_history()
    arrays = distill.stack_states(states)
    cfg = override(CFG, {"train.steps": 6, "train.batch_size": 2, "train.log_every": 1,
                         "train.eval_every": 3, "train.checkpoint_every": 3,
                         "train.learning_rate": 3e-3, "train.warmup_steps": 1})
    full = loop.train_distill(cfg, tmp_path / "a", arrays, arrays, progress=False)
    assert (full["start_step"], full["end_step"]) == (0, 6)
    assert full["eval_after"]["mse"] < full["eval_before"]["mse"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 3, 6]
    assert all("states_per_s" in r for r in rows if r["kind"] == "train")
    assert any((tmp_path / "a" / "tensorboard").iterdir())
    # killed after 3 steps and resumed: the same params as the uninterrupted run
    loop.train_distill(cfg, tmp_path / "b", arrays, arrays, progress=False, stop_after=3)
    rest = loop.train_distill(cfg, tmp_path / "b", arrays, arrays, progress=False)
    assert (rest["start_step"], rest["end_step"]) == (3, 6)
    chex.assert_trees_all_close(rest["state"].params, full["state"].params, atol=1e-6)
    with pytest.raises(ValueError, match="cannot resume"):  # other states: a clear error
        loop.train_distill(cfg, tmp_path / "b", {k: v[:-1] for k, v in arrays.items()},
                           arrays, progress=False)


def test_cli_help_and_v1_config_refused():
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "distill_lens.py"), "gen",
                          "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--histories" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "distill_lens.py"), "gen",
                          "--config", "tiny", "--data", "/tmp/unused"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "v1" in bad.stderr


def test_distillation_runs_on_a_qwen_style_base():
    """LensNet distillation is architecture-agnostic: on a tiny Qwen3 base (q/k norms,
    explicit head_dim) the teacher's read-pass keys, the states and the update work, and
    training fits the teacher."""
    import dataclasses

    from mcjax.config import tiny_architectures

    qwen = tiny_architectures()["qwen3"]
    cfg = dataclasses.replace(CFG, base_config=qwen)
    bp = base.init_params(qwen, jax.random.key(0))
    g = init_gist_params(cfg.gist, qwen.hidden_size, jax.random.key(1), block_size=K)
    gister = BlockGister.from_base(cfg.gist, g, bp, qwen, block_size=K,
                                   retrieval=cfg.retrieval)
    keys = retrieval.BlockKeys(cfg.retrieval, qwen, K)
    tree = MegaContextTree.in_memory(MC, gister, view_capacity_tokens=2048, block_keys=keys)
    tree.append(np.random.default_rng(4).integers(3, qwen.vocab_size, 1600))
    states = distill.distill_states(bp, tree.view(), cfg, [7, 8], rounds=2,
                                    rng=np.random.default_rng(0), explore=0.0)
    batch = distill.batch_from_states(distill.stack_states(states))
    first, last = _fit(cfg, batch, 30)
    assert last["mse"] < 0.5 * first["mse"]
