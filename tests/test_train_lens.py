"""LensNet training (SPEC §2.8.2-3): counterfactual utilities on identical next-token targets
that match a one-variant-at-a-time computation, gradients to LensNet only, sharded step
equality, kill-and-resume determinism, a short run that lowers the held-out lens loss, and
the joint step training both nets."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mcjax import lens as lens_mod
from mcjax import sharding
from mcjax import working_context as wcm
from mcjax.base import model as base
from mcjax.checkpoint import Checkpointer
from mcjax.config import get_config, override
from mcjax.gist import init_gist_params
from mcjax.lens import init_lens
from mcjax import counterfactuals, scoring
from mcjax.counterfactuals import lens_task
from mcjax.data import held_out_batches
from mcjax.scoring import load_frozen
from mcjax.train import losses, steps
from mcjax.nets import load_identified, source_identity
from mcjax.train.loop import gist_layout, gist_train_layouts, train_lens
from mcjax.tree import BlockGister, MegaContextTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny: P = 1,088 prefix tokens (one LOD2 group, LOD1 blocks, raw tail), H = 16, w_max = 256;
# 3 candidates (2 expansions, 1 collapse) keep every example's V = 4 variants cheap.
CANDIDATES = 3


@pytest.fixture(scope="module")
def tiny():
    # absolute positions, as these tests were written for (the independent references below
    # handle both schemes; the sharded-step comparison's tolerances were set under absolute)
    cfg = get_config("tiny", ["mc.position_scheme=absolute"])
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    task = lens_task(cfg, CANDIDATES)
    D = cfg.base_config.hidden_size
    gist = init_gist_params(cfg.gist, D, jax.random.key(3), block_size=cfg.mc.block_size)
    lens = init_lens(cfg.lens, cfg.mc, D, jax.random.key(4))
    tokens = jnp.asarray(held_out_batches(frozen, 1, 4, task.window_len, seed=7)[0])
    base_snapshot = jax.tree.map(lambda x: np.array(x, copy=True), frozen.params)
    return cfg, frozen, task, gist, lens, tokens, base_snapshot


def _copy(tree):
    return jax.tree.map(jnp.array, tree)


@pytest.fixture(scope="module")
def lens_steps(tiny):
    """One lens train step from the same state and batch on a 1-device and a 2x4 mesh."""
    cfg, frozen, task, gist, lens, tokens, _ = tiny
    opt = steps.make_optimizer(cfg.train)
    step = steps.LensStep(cfg, task)
    out = {}
    for name, shape in {"single": (1, 1), "mesh": (2, 4)}.items():
        mesh = sharding.make_mesh(shape)
        state = steps.init_state({"lens": _copy(lens)}, opt)  # the step donates its state
        fz = step.frozen_inputs(frozen.params, gist)
        sh = steps.jit_step(step, opt, mesh, state, fz, tokens.shape[0])
        new_state, metrics = sh.train(sh.place_state(state), sh.place_base(fz),
                                      sh.place_batch(tokens), sh.place_rng(jax.random.key(5)))
        out[name] = (new_state, metrics, sh, mesh)
    return out


def _bank_levels(task, mc):
    """Levels used by the task's layout bank; every layout checked legal (sink included)
    and left with room for one counterfactual expansion."""
    bank = counterfactuals.lens_layout_bank(task)
    K, W = mc.block_size, mc.w_max
    levels = set()
    for i in range(task.num_layouts):
        wc = jax.tree.map(lambda x: x[i], bank)
        wcm.check_invariants(wc, None, mc)
        assert int(wc.num_tokens) == task.prefix_len
        assert int(np.sum(wc.valid)) <= W - (K - 1)
        levels |= set(np.asarray(wc.level)[np.asarray(wc.valid)].tolist())
    return levels


def test_layout_bank_is_legal_and_leaves_room_for_one_expansion(tiny):
    cfg, _, task, _, _, _, _ = tiny
    assert cfg.mc.sink_blocks == 1
    # With the sink (SPEC §2.4 inv. 7) the prefix's only LOD2 group, tokens [0, 1024), holds
    # the sink block and never forms, and the next one, [1024, 2048), lies past the 1,088
    # prefix: the bank of the tiny task has LOD0 and LOD1 only (slot 0 a real token, checked
    # by check_invariants). Without a sink the same prefix reaches every level.
    assert _bank_levels(task, cfg.mc) == {0, 1}
    mc0 = override(cfg.mc, {"sink_blocks": 0})
    task0 = counterfactuals.LensTask.build(mc0, task.prefix_len, candidates=CANDIDATES,
                                  layout_seed=task.layout_seed)
    assert _bank_levels(task0, mc0) == {0, 1, 2}
    with pytest.raises(ValueError, match="w_max=100 cannot hold"):
        counterfactuals.LensTask.build(override(cfg.mc, {"w_max": 100}), 1088)
    with pytest.raises(ValueError, match="multiple of block_size"):
        counterfactuals.LensTask.build(cfg.mc, 1000)


def test_illegal_penalty_reads_the_unmasked_head_that_the_score_mask_hides(tiny):
    cfg, _, task, _, lens, _, _ = tiny
    mc, D = cfg.mc, cfg.base_config.hidden_size
    bank = jax.tree.map(jnp.asarray, counterfactuals.lens_layout_bank(task))
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=bank.level.shape + (D,)), jnp.float32)
    nt = mc.num_tail_gists
    tail = lens_mod.TailGists(embeds=jnp.asarray(rng.normal(size=(task.num_layouts, nt, D)),
                                                 jnp.float32),
                              level=jnp.ones((task.num_layouts, nt), jnp.int32),
                              valid=jnp.ones((task.num_layouts, nt), bool))
    scores, raw = jax.jit(lambda p, e, w, t: losses.lens_scores_and_raw(
        p, cfg.lens, mc, e, w, t))(lens, emb, bank, tail)
    np.testing.assert_array_equal(scores, lens_mod.mask_illegal(raw, bank, mc))
    chex.assert_trees_all_close(scores, lens_mod.lens_scores(lens, emb, bank, tail, cfg.lens, mc),
                                atol=1e-6)
    # where the raw score's direction is legal (the allocator's rules) the mask keeps it
    may_expand, may_collapse = jax.vmap(lambda w: wcm.legal_directions(w, mc))(bank)
    r = np.asarray(raw)
    kept = np.asarray(bank.valid) & np.where(r > 0, np.asarray(may_expand),
                                             np.asarray(may_collapse))
    assert kept.any() and (np.asarray(scores) != r).any()
    np.testing.assert_array_equal(np.asarray(scores)[kept], r[kept])


def test_counterfactual_utilities_use_identical_next_token_targets_and_match_one_variant_at_a_time(
        tiny):
    cfg, frozen, task, gist, _, tokens, _ = tiny
    mc, bp, bc = cfg.mc, frozen.params, cfg.base_config
    P, H = task.prefix_len, task.horizon
    fn = jax.jit(lambda gp, bp, t, r: counterfactuals.gistnet_counterfactuals(
        gp, cfg.gist, bp, bc, t, r, task))
    cf = jax.device_get(fn(gist, bp, tokens, jax.random.key(11)))
    # every variant of every example is scored on tokens[P : P+H], each target predicted from
    # the slot holding the token right before it
    np.testing.assert_array_equal(cf.targets, np.asarray(tokens[:, P:P + H]))
    np.testing.assert_array_equal(
        cf.source_token, np.broadcast_to(P - 1 + np.arange(H), cf.source_token.shape))
    assert cf.valid.any(axis=1).all() and cf.valid[:, 0].all()  # some action is always legal

    # independent recomputation for example 0: a real MegaContextTree, single edits with
    # expand/collapse, only the valid slots (no padding), the validated forward
    b = 0
    gister = BlockGister.from_base(cfg.gist, gist, bp, bc, block_size=mc.block_size)
    tree = MegaContextTree.in_memory(mc, gister)
    tree.append(np.asarray(tokens[b, :P]))
    view = tree.view()
    wc = jax.tree.map(lambda x: jnp.asarray(x[b]), cf.wc)
    cont = base.embed_tokens(bp, tokens[b, P:P + H - 1])
    means = []
    for v in range(task.num_variants):
        variant = wc
        if v > 0:
            kind, slot = int(cf.candidates.kind[b, v - 1]), int(cf.candidates.slot[b, v - 1])
            if not cf.valid[b, v - 1]:
                continue
            edit = wcm.expand if kind == counterfactuals.EXPAND_CANDIDATE else wcm.collapse
            variant, applied = edit(wc, slot, mc)
            assert bool(applied)
            wcm.check_invariants(variant, view, mc)
        emb, pos, valid = wcm.materialize(variant, view, bp, mc)
        n = int(np.sum(valid))
        embeds = jnp.concatenate([emb[:n], cont])[None]
        first = P if cfg.mc.position_scheme == "absolute" else n
        positions = jnp.concatenate([pos[:n], first + jnp.arange(H - 1)])[None]
        logp = jax.nn.log_softmax(base.forward(bp, bc, embeds=embeds, positions=positions)
                                  [0, -H:], -1)
        nll = -np.asarray(jnp.take_along_axis(logp, tokens[b, P:P + H, None], -1)[:, 0])
        np.testing.assert_allclose(cf.nll[b, v], nll, atol=2e-4, err_msg=f"variant {v}")
        means.append(nll.mean())
        if v > 0:  # value of detail: NLL saved by an expansion, NLL cost of a collapse
            sign = -1.0 if kind == counterfactuals.EXPAND_CANDIDATE else 1.0
            np.testing.assert_allclose(cf.value[b, v - 1], sign * (nll.mean() - means[0]),
                                       atol=2e-4)
    assert len(means) >= 2


@pytest.mark.parametrize("gist_input", ["embeddings", "hidden"])
def test_counterfactual_prefix_tree_holds_the_runtime_trees_gists_for_either_gist_input(
        tiny, gist_input):
    # the lens task's gists must be the ones a session's tree holds: a GistNet that reads
    # hidden states was once fed token embeddings here
    cfg, frozen, task, _, _, tokens, _ = tiny
    cfg = override(cfg, {"gist.input": gist_input, "gist.input_layer": 1})
    bp, bc, mc, P = frozen.params, cfg.base_config, cfg.mc, task.prefix_len
    gist = init_gist_params(cfg.gist, bc.hidden_size, jax.random.key(5),
                            block_size=mc.block_size)
    fn, children = scoring.gist_inputs("gistnet", bp, bc, gist, cfg.gist, tokens[:, :P])
    view = counterfactuals.prefix_tree(fn, children, tokens, task)
    for b in (0, tokens.shape[0] - 1):
        tree = MegaContextTree.in_memory(mc, BlockGister.from_base(
            cfg.gist, gist, bp, bc, block_size=mc.block_size))
        tree.append(np.asarray(tokens[b, :P]))
        ref = tree.view()
        for lvl in range(mc.num_levels):
            n = int(ref.counts[lvl + 1])
            assert n == int(view.counts[b, lvl + 1]) and n > 0
            np.testing.assert_allclose(np.asarray(view.gists[lvl][b, :n]),
                                       np.asarray(ref.gists[lvl][:n]), atol=2e-4, rtol=2e-3,
                                       err_msg=f"{gist_input} LOD{lvl + 1}, window {b}")


LENS_V2 = {"lens.query_tokens": 3, "lens.query_layer": 2, "lens.retrieval_features": True}


def test_v2_counterfactuals_read_the_question_as_the_runtime_and_train_every_v2_param(tiny):
    from mcjax import retrieval

    cfg, frozen, _, gist, _, tokens, _ = tiny
    cfg = override(cfg, LENS_V2)
    bp, bc, mc = frozen.params, cfg.base_config, cfg.mc
    K, rc = mc.block_size, cfg.retrieval
    task = lens_task(cfg, CANDIDATES)
    assert task.retrieval == rc and task.lens == cfg.lens
    P = task.prefix_len
    cf = jax.device_get(jax.jit(lambda gp, b, t, r: counterfactuals.gistnet_counterfactuals(
        gp, cfg.gist, b, bc, t, r, task))(gist, bp, tokens, jax.random.key(11)))
    assert cf.query.hidden.shape == (tokens.shape[0], 3, bc.hidden_size)
    assert cf.slot_retrieval.shape == (tokens.shape[0], mc.w_max, 2)
    # independent reference per window: the runtime's tree (GistNet, key reader) and the
    # refocus's read of its newest tokens
    for b in (0, tokens.shape[0] - 1):
        tree = MegaContextTree.in_memory(
            mc, BlockGister.from_base(cfg.gist, gist, bp, bc, block_size=K, retrieval=rc),
            block_keys=retrieval.BlockKeys(rc, bc, K))
        tree.append(np.asarray(tokens[b, :P]))
        view = tree.view()
        read = retrieval.tail_read(bp, bc, rc, view.tokens, view.counts[0], hidden_layer=2,
                                   hidden_tokens=3)
        rel, ok = retrieval.block_relevance(view.keys, view.counts[0], read["queries"],
                                            read["query_valid"], rc, mc, bc)
        blocks = retrieval.block_scores(rel, ok, rc)
        n = P // K
        np.testing.assert_allclose(cf.retrieval_blocks[b][:n], np.asarray(blocks)[:n],
                                   atol=1e-3)
        assert np.asarray(blocks)[:n].max() > 0  # some block is relevant: not a 0 == 0 check
        np.testing.assert_allclose(cf.query.hidden[b], read["hidden"], atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(cf.query.valid[b], read["hidden_valid"])
        wc = jax.tree.map(lambda x: jnp.asarray(x[b]), cf.wc)
        np.testing.assert_allclose(cf.slot_retrieval[b], retrieval.slot_retrieval_features(
            wc, rel, blocks, mc), atol=1e-3)

    # one v2 lens step reaches every LensNet param, the question's and retrieval's too
    lens = init_lens(cfg.lens, mc, bc.hidden_size, jax.random.key(4))
    assert {"query_proj", "query_pos", "retrieval_mlp"} <= set(lens)
    opt = steps.make_optimizer(cfg.train)
    step = steps.LensStep(cfg, task)
    state = steps.init_state({"lens": lens}, opt)
    new, metrics = jax.jit(lambda st, fz, t, r: step.update(opt, st, fz, t, r))(
        state, step.frozen_inputs(bp, gist), tokens, jax.random.key(5))
    assert np.isfinite(float(metrics["loss"]))
    for path, m in jax.tree_util.tree_leaves_with_path(_first_moments(new)):
        assert float(jnp.abs(m).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    # a v2 task without the retrieval read is refused, not silently unconditioned
    with pytest.raises(ValueError, match="retrieval read"):
        counterfactuals.LensTask.build(mc, P, lens=cfg.lens)


def test_train_lens_fine_tunes_a_params_file_lensnet_on_a_params_file_gistnet(tmp_path, tiny):
    from mcjax.assets import save_gist_params, save_params_safetensors

    cfg, frozen, _, gist, _, _, _ = tiny
    cfg = override(cfg, {**LENS_V2, "train.steps": 1, "train.learning_rate": 1e-9,
                         "train.warmup_steps": 1, "train.checkpoint_every": 1,
                         "train.log_every": 1})
    gist_file, _ = save_gist_params(gist, cfg, tmp_path / "g.safetensors", step=7)
    start = init_lens(cfg.lens, cfg.mc, cfg.base_config.hidden_size, jax.random.key(9))
    lens_file = save_params_safetensors(start, tmp_path / "l.safetensors", {"part": "lens"})
    out = train_lens(cfg, tmp_path / "run", gist_params=gist_file, init_lens=lens_file,
                     progress=False, eval_batches=0, candidates=CANDIDATES)
    # lr 1e-9: one step leaves the warm start in place (and far from a random init)
    chex.assert_trees_all_close(jax.device_get(out["state"].params["lens"]), start,
                                atol=1e-6)
    meta = Checkpointer(tmp_path / "run", create=False).read_meta()["extra"]
    assert meta["gistnet"]["source"] == "params_file" and meta["gistnet"]["step"] == 7
    # the evaluation and a session find that GistNet again from the LensNet checkpoint
    from mcjax.nets import resolve_networks
    from mcjax.runtime import Session

    nets = resolve_networks(cfg, frozen.params, lens_checkpoint=tmp_path / "run")
    assert nets.sources["gist"]["source"] == "params_file"
    chex.assert_trees_all_close(jax.device_get(nets.gist), jax.device_get(gist), atol=0)
    session = Session.from_checkpoints((cfg.base_config, frozen.params), cfg,
                                       lens_checkpoint=tmp_path / "run", batch_size=1,
                                       max_tokens=1024)
    assert session.provenance["gist"]["source"] == "params_file"
    with pytest.raises(ValueError, match="not both"):
        train_lens(cfg, tmp_path / "x", gist_params=gist_file, gist_workdir=tmp_path / "run")


def _first_moments(state):
    """Adam's first moments after one step: (1 - b1) x the clipped gradient, per leaf."""
    return optax.tree_utils.tree_get(state.opt_state, "mu")


def test_one_lens_step_trains_every_lensnet_param_and_no_base_or_gistnet_param(tiny, lens_steps):
    cfg, frozen, task, gist, lens, tokens, base_snapshot = tiny
    new_state, metrics, _, _ = lens_steps["single"]
    assert set(new_state.params) == {"lens"}  # base model and GistNet are not trainable state
    for path, m in jax.tree_util.tree_leaves_with_path(_first_moments(new_state)):
        assert float(jnp.abs(m).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(lens),
                            jax.tree.leaves(new_state.params["lens"])):
        assert not np.array_equal(a, b), f"{jax.tree_util.keystr(path)} did not change"
    # the lens loss sends no gradient into GistNet or the base model (utilities are targets)
    grad_fn = jax.jit(jax.grad(lambda gp, bp: losses.lens_loss(
        lens, gp, bp, tokens, jax.random.key(5), base_cfg=cfg.base_config, gist_cfg=cfg.gist,
        lens_cfg=cfg.lens, task=task)[0], argnums=(0, 1)))
    for name, grads in zip(("GistNet", "base"), grad_fn(gist, frozen.params)):
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert float(jnp.abs(g).max()) == 0, f"{name} {jax.tree_util.keystr(path)} got a grad"
    # and the frozen inputs of the step are untouched
    fresh_gist = init_gist_params(cfg.gist, cfg.base_config.hidden_size, jax.random.key(3),
                                  block_size=cfg.mc.block_size)
    chex.assert_trees_all_equal(fresh_gist, gist)
    chex.assert_trees_all_equal(jax.device_get(frozen.params), base_snapshot)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    for term in ("regression", "ranking", "budget", "illegal"):
        assert np.isfinite(float(metrics[term])) and float(metrics[term]) >= 0, term


def test_sharded_lens_step_equals_single_device_step_with_declared_shardings(tiny, lens_steps):
    s1, m1, _, _ = lens_steps["single"]
    s8, m8, sh8, mesh8 = lens_steps["mesh"]
    mu1, mu8 = jax.device_get((_first_moments(s1), _first_moments(s8)))
    # the gradients agree (atol: summation-order noise of 8 devices on moments <= 1e-4)
    chex.assert_trees_all_close(mu1, mu8, atol=1e-6, rtol=1e-3)
    p1, p8 = jax.device_get((s1.params, s8.params))
    for (path, a), b, m in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p8),
                               jax.tree.leaves(mu1)):
        # Adam's first step is ~lr * sign(grad): where the true gradient is 0 (e.g. attention
        # key biases, which softmax ignores) float noise of either sign moves the param
        signal = np.abs(m) > 1e-7
        np.testing.assert_allclose(a[signal], b[signal], atol=2e-5, rtol=2e-4,
                                   err_msg=jax.tree_util.keystr(path))
    # The utilities are differences of mean NLLs (~5.6 nats) of ~1e-3 nats; the sharded and
    # unsharded counterfactual forwards agree on them to 1-2 float32 ulps (~1e-6). The
    # ranking weights its pairs by |target_i − target_j|, targets = tanh((value − mean) /
    # (std + 1e-2)), which turns one ulp into ~1e-3 of the term (measured: 7e-4 with the
    # sink's LOD0/LOD1 bank, 1e-4 without a sink), so it gets the gradients' rtol of 1e-3
    # (x2); the other terms stay at 1e-4.
    for k in ("loss", "regression", "ranking", "budget", "illegal"):
        np.testing.assert_allclose(float(m1[k]), float(m8[k]),
                                   rtol=2e-3 if k == "ranking" else 1e-4, atol=1e-6, err_msg=k)
    for leaf, want in zip(jax.tree.leaves(s8), jax.tree.leaves(sh8.state_sharding)):
        assert leaf.sharding == want
    assert sh8.batch_sharding.spec[0] == "data" and mesh8.shape["model"] == 4
    # GistNet rides along replicated; base params follow the model-axis rules
    assert all(s.is_fully_replicated for s in jax.tree.leaves(sh8.base_sharding["gist"]))
    assert sh8.base_sharding["base"] == sharding.param_shardings(tiny[1].params, mesh8)
    assert any(s.spec != P() for s in jax.tree.leaves(sh8.base_sharding["base"]))
    assert m8["loss"].sharding.is_fully_replicated


# --------------------------------------------------------------------------- runs
#
# The train_lens.py runs are separate processes started before the first test of this
# module, so they train while this process runs the in-process tests: an uninterrupted
# reference run, and the same run SIGKILLed after a checkpoint and then resumed.

RUN_STEPS = 30
RUN_SETTINGS = {"train.steps": RUN_STEPS, "train.checkpoint_every": 10, "train.log_every": 10,
                "train.eval_every": 1000, "train.warmup_steps": 4,
                "train.learning_rate": 3e-3}
EVAL_BATCHES = 4
RUN_TIMEOUT = 1200


def _train_lens_cmd(workdir, eval_batches: int) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train_lens.py"), "--config",
           "tiny", "--workdir", str(workdir), "--eval-batches", str(eval_batches),
           "--candidates", str(CANDIDATES), "--no-progress"]
    for k, v in RUN_SETTINGS.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


class _Runs:
    """The background processes and what the kill/resume watcher saw."""

    def __init__(self, root):
        self.root = root
        self.ref_dir, self.killed_dir = root / "ref", root / "killed"
        self.procs: list[subprocess.Popen] = []
        self.kill_returncode = None
        self.killed_at = None  # latest complete checkpoint when the run was killed
        self.resume = None

    def start(self, workdir, eval_batches: int, log: str) -> subprocess.Popen:
        with open(self.root / log, "w") as err:
            proc = subprocess.Popen(_train_lens_cmd(workdir, eval_batches),
                                    stdout=subprocess.DEVNULL, stderr=err)
        self.procs.append(proc)
        return proc

    def kill_then_resume(self, proc) -> None:
        """SIGKILL `proc` once a checkpoint of step >= 10 is complete, then resume it."""
        ckpts = self.killed_dir / "checkpoints"
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline and proc.poll() is None:
            done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
            if any(int(p.name) >= 10 for p in done):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        self.kill_returncode = proc.wait()
        self.killed_at = Checkpointer(self.killed_dir, create=False).latest_step()
        # no held-out evaluation while resuming: it does not touch the trained params
        self.resume = self.start(self.killed_dir, 0, "resume.log")

    def wait(self, proc, log: str) -> None:
        rc = proc.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, f"train_lens.py failed ({rc}):\n{(self.root / log).read_text()[-3000:]}"


@pytest.fixture(scope="module", autouse=True)
def lens_runs(tmp_path_factory):
    runs = _Runs(tmp_path_factory.mktemp("lens_runs"))
    runs.reference = runs.start(runs.ref_dir, EVAL_BATCHES, "reference.log")
    killed = runs.start(runs.killed_dir, 0, "killed.log")
    runs.watcher = threading.Thread(target=runs.kill_then_resume, args=(killed,), daemon=True)
    runs.watcher.start()
    yield runs
    runs.watcher.join(timeout=RUN_TIMEOUT)
    for proc in runs.procs:  # only ours, by handle; normally all have exited already
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _final_params(workdir, lens_like, run_cfg):
    abstract = steps.init_state({"lens": lens_like}, steps.make_optimizer(run_cfg.train))
    ck = Checkpointer(workdir, create=False)
    try:
        state, _ = ck.restore(abstract, run_cfg)
    finally:
        ck.close()
    return jax.device_get(state.params), int(state.step)


def test_short_tiny_lens_run_lowers_held_out_lens_loss(lens_runs):
    lens_runs.wait(lens_runs.reference, "reference.log")
    result = json.loads((lens_runs.ref_dir / "summary.json").read_text())
    before, after = result["eval_before"]["lens"], result["eval_after"]["lens"]
    # same held-out windows, layouts and candidates (fixed eval key) before and after. On the
    # random tiny base the utilities are float-level noise (|value| ~ 0.003 nats/token, far
    # below utility_eps), so what a short run can learn is structure: calibrated (small)
    # scores, legal directions, balanced budget pressure
    assert after["loss"] < before["loss"] - 0.03, (before, after)
    assert after["regression"] < before["regression"], (before, after)
    assert after["illegal"] < 0.5 * before["illegal"], (before, after)
    assert result["gistnet"] == {"source": "untrained", "seed": 0}
    rows = [json.loads(line) for line in open(lens_runs.ref_dir / "metrics.jsonl")]
    assert rows[0]["kind"] == "info" and "untrained GistNet" in rows[0]["gistnet"]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [10, 20, 30]


def test_lens_run_killed_with_sigkill_resumes_to_the_same_params(tiny, lens_runs, tmp_path):
    frozen_cfg, lens_like = tiny[0], tiny[4]  # the tiny architecture; a LensNet param tree
    run_cfg = override(frozen_cfg, RUN_SETTINGS)
    lens_runs.wait(lens_runs.reference, "reference.log")
    lens_runs.watcher.join(timeout=RUN_TIMEOUT)
    assert lens_runs.kill_returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert lens_runs.killed_at is not None and 10 <= lens_runs.killed_at < RUN_STEPS
    lens_runs.wait(lens_runs.resume, "resume.log")
    summary = json.loads((lens_runs.killed_dir / "summary.json").read_text())
    assert summary["start_step"] == lens_runs.killed_at and summary["end_step"] == RUN_STEPS
    resumed, step_r = _final_params(lens_runs.killed_dir, lens_like, run_cfg)
    reference, step_u = _final_params(lens_runs.ref_dir, lens_like, run_cfg)
    assert step_r == step_u == RUN_STEPS
    chex.assert_trees_all_close(resumed, reference, atol=1e-6)

    # GistNet params load from a gist workdir; resuming with another GistNet than the
    # checkpoints were made with is a clear error (raised before any model is loaded)
    gist_dir = tmp_path / "gist"
    gp = init_gist_params(frozen_cfg.gist, frozen_cfg.base_config.hidden_size,
                          jax.random.key(9), block_size=frozen_cfg.mc.block_size)
    ck = Checkpointer(gist_dir)
    ck.save(3, steps.init_state({"gist": gp}, steps.make_optimizer(frozen_cfg.train)),
            {"epoch": 0, "cursor": 0}, frozen_cfg)
    ck.wait()
    ck.close()
    source = source_identity(frozen_cfg, workdir=gist_dir)
    loaded = load_identified(source, frozen_cfg, "gist")
    chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(gp))
    assert source["source"] == "checkpoint" and source["step"] == 3
    with pytest.raises(ValueError, match="cannot resume .* gistnet="):
        train_lens(run_cfg, lens_runs.killed_dir, gist_workdir=gist_dir, progress=False,
                   eval_batches=0, candidates=CANDIDATES)


def test_joint_step_trains_gistnet_and_lensnet_on_the_same_batch(tiny):
    cfg, frozen, task, gist, lens, tokens, _ = tiny
    # the GistNet term cycles over train_gist's layouts (tiny: lod1_keep1, lod1+lod2_keep1)
    layouts = gist_train_layouts(cfg)
    assert list(layouts) == ["lod1_keep1", "lod1+lod2_keep1"]
    step = steps.JointStep(cfg, tuple(layouts.values()), task)
    with pytest.raises(ValueError, match="tuple of GistLayouts"):
        steps.JointStep(cfg, gist_layout(cfg), task)
    opt = steps.make_joint_optimizer(cfg.train)
    params = {"gist": _copy(gist), "lens": _copy(lens)}
    state = steps.init_state(params, opt)
    update = jax.jit(lambda s, b, t, r: step.update(opt, s, b, t, r))
    new_state, metrics = update(state, frozen.params, tokens, jax.random.key(5))
    assert int(metrics["layout"]) == 0
    for net in ("gist", "lens"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params[net]),
                                jax.tree.leaves(new_state.params[net])):
            assert not np.array_equal(a, b), f"{net}{jax.tree_util.keystr(path)} did not change"
        assert float(metrics[f"{net}/grad_norm"]) > 0
    # summed objective: both terms present and finite, total = gist + lens_weight * lens
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["gist/loss"]) + float(metrics["lens/loss"]),
                               rtol=1e-6)
    assert np.isfinite(float(metrics["gist/delta_nll"])) and int(new_state.step) == 1
    # the next step trains on the next layout (same compiled step)
    state2, metrics2 = update(new_state, frozen.params, tokens, jax.random.key(6))
    assert int(metrics2["layout"]) == 1 and int(state2.step) == 2
    assert np.isfinite(float(metrics2["gist/loss"])) and np.isfinite(float(metrics2["loss"]))
