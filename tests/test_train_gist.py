"""GistNet training: next-token targets, identical target sets, every param trained, sharded
step equality, kill-and-resume determinism, and a short run that lowers held-out loss."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import sharding
from mcjax.base import model as base
from mcjax.checkpoint import (Checkpointer, CheckpointMismatchError, check_compatible,
                              config_to_json, nets_in)
from mcjax.config import get_config, override
from mcjax.gist import embedding_rms, gist_blocks, init_gist_params
from mcjax import scoring
from mcjax.nets import init_params
from mcjax.scoring import load_frozen
from mcjax.train import steps
from mcjax.train.loop import train_gist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    frozen = load_frozen(cfg)
    layout = scoring.GistLayout.build(cfg.mc, prefix_len=1088, horizon=cfg.mc.horizon)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, layout.window_len)),
                         jnp.int32)
    return cfg, frozen, layout, tokens


def test_layout_keeps_the_sink_compresses_aligned_blocks_and_keeps_the_newest_raw(tiny):
    cfg, _, layout, _ = tiny
    # 34 prefix blocks: the sink block, one LOD2 group of blocks 1..32, one raw block
    assert (layout.sink_blocks, layout.lod2_groups, layout.lod1_blocks,
            layout.keep_raw_blocks) == (1, 1, 0, 1)
    assert layout.position_scheme == "compact"  # the default (MCConfig's)
    absolute = dataclasses.replace(layout, position_scheme="absolute")
    pos = absolute.positions()
    np.testing.assert_array_equal(pos[:32], np.arange(32))  # the sink: real tokens first
    assert pos[32] == 32 + 512  # centre of [32, 1056)
    np.testing.assert_array_equal(pos[33:], np.arange(1056, layout.window_len - 1))
    np.testing.assert_array_equal(absolute.positions(truncated=True),
                                  np.r_[np.arange(32), np.arange(1056, layout.window_len - 1)])
    np.testing.assert_array_equal(layout.positions(), np.arange(layout.num_slots))
    with pytest.raises(ValueError, match="multiple of block_size"):
        scoring.GistLayout.build(cfg.mc, prefix_len=1000)
    with pytest.raises(ValueError, match="nothing to compress"):
        scoring.GistLayout.build(cfg.mc, prefix_len=1088, keep_raw_blocks=33)


def _manual_nll(frozen, cfg, tokens, embeds, positions, first_target):
    """Independent reference: a plain forward, NLL of tokens[first_target:] from the last
    slots (slot holding token i predicts token i + 1)."""
    n = tokens.shape[1] - first_target
    logits = base.forward(frozen.params, cfg.base_config, embeds=embeds,
                          positions=jnp.broadcast_to(jnp.asarray(positions), embeds.shape[:2]))
    logp = jax.nn.log_softmax(logits[:, -n:], -1)
    return -jnp.take_along_axis(logp, tokens[:, first_target:, None], -1)[..., 0]


def test_targets_are_the_next_tokens_and_identical_for_every_variant(tiny):
    cfg, frozen, compact, tokens = tiny
    layout = dataclasses.replace(compact, position_scheme="absolute")  # positions = token ids
    P, H = layout.prefix_len, layout.horizon
    targets = scoring.continuation_targets(tokens, layout)
    for i in range(H):  # target i is the token after the slot that predicts it
        np.testing.assert_array_equal(targets[:, i], tokens[:, P + i])
    bc, bp = cfg.base_config, frozen.params
    emb = base.embed_tokens(bp, tokens[:, : P + H - 1])
    full = scoring.full_context_nll(bp, bc, tokens, layout)[0]
    chex.assert_trees_all_close(full, _manual_nll(frozen, cfg, tokens, emb,
                                                  np.arange(P + H - 1), P), atol=1e-5)
    trunc = scoring.substitution_nll(bp, bc, tokens, layout, None)[0]
    keep = np.r_[np.arange(32), np.arange(layout.raw_start, P + H - 1)]  # sink + raw tail
    chex.assert_trees_all_close(trunc, _manual_nll(frozen, cfg, tokens, emb[:, keep], keep, P),
                                atol=1e-5)
    trunc_c = scoring.substitution_nll(bp, bc, tokens, compact, None)[0]  # compact: packed
    chex.assert_trees_all_close(trunc_c, _manual_nll(frozen, cfg, tokens, emb[:, keep],
                                                     np.arange(len(keep)), P), atol=1e-5)
    lod1 = emb[:, 32:1056].reshape(2, 32, 32, -1).mean(2)
    gists = lod1.mean(1, keepdims=True)  # the LOD2 gist of the 32 LOD1 means
    mean = scoring.substitution_nll(bp, bc, tokens, layout, scoring.mean_pool_gist_fn)[0]
    inputs = jnp.concatenate([emb[:, :32], gists, emb[:, layout.raw_start:]], 1)
    chex.assert_trees_all_close(
        mean, _manual_nll(frozen, cfg, tokens, inputs, layout.positions(), P), atol=1e-5)


def test_dense_targets_cover_every_raw_tail_position_and_all_raw_gives_zero_kl(tiny):
    cfg, frozen, _, tokens = tiny
    bc, bp = cfg.base_config, frozen.params
    lay = scoring.GistLayout.build(cfg.mc, prefix_len=1088, keep_raw_blocks=4, use_lod2=False,
                                  horizon=cfg.mc.horizon)
    n = lay.scored(dense=True)
    assert n == 4 * 32 + lay.horizon - 1 and lay.scored(dense=False) == lay.horizon
    np.testing.assert_array_equal(scoring.continuation_targets(tokens, lay, dense=True),
                                  tokens[:, lay.raw_start + 1: lay.window_len])
    gists = jnp.asarray(np.random.default_rng(3).normal(0, .02, (2, lay.num_gists,
                                                                    bc.hidden_size)))
    nll = scoring.substitution_nll_from_gists(bp, bc, tokens, lay, gists, dense=True)[0]
    emb = base.embed_tokens(bp, tokens[:, : lay.window_len - 1])
    inputs = jnp.concatenate([emb[:, :32], gists.astype(emb.dtype), emb[:, lay.raw_start:]], 1)
    chex.assert_trees_all_close(nll, _manual_nll(frozen, cfg, tokens, inputs, lay.positions(),
                                                 lay.raw_start + 1), atol=1e-5)
    # Nothing gisted (every block after the sink raw): the compressed context is the full
    # one, so the dense KL to the full context is exactly zero at every position.
    all_raw = dataclasses.replace(lay, keep_raw_blocks=33, lod1_blocks=0)
    none = jnp.zeros((2, 0, bc.hidden_size))
    _, logp = scoring.substitution_nll_from_gists(bp, bc, tokens, all_raw, none, dense=True)
    _, full_logp = scoring.full_context_nll(bp, bc, tokens, all_raw, dense=True)
    kl = scoring.kl_to_teacher(full_logp, logp)
    assert kl.shape == (2, all_raw.window_len - 1 - 32)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-5)


def test_hidden_children_are_the_read_pass_features(tiny):
    cfg, frozen, layout, tokens = tiny
    g = dataclasses.replace(cfg.gist, input="hidden", input_layer=2, read_chunk=512)
    ch = scoring.lod1_children(frozen.params, cfg.base_config, g, tokens[:, :1056])
    ref = base.layer_hidden(frozen.params, cfg.base_config, tokens[:, :1056], layer=2,
                            chunk=512)
    chex.assert_trees_all_close(ch, ref)
    emb = scoring.lod1_children(frozen.params, cfg.base_config, cfg.gist, tokens[:, :1056])
    chex.assert_trees_all_close(emb, base.embed_tokens(frozen.params, tokens[:, :1056]))


def test_one_step_trains_every_gistnet_param_and_no_base_param(tiny):
    cfg, frozen, layout, tokens = tiny
    gp = init_gist_params(cfg.gist, cfg.base_config.hidden_size, jax.random.key(1))
    step = steps.GistStep(cfg, (layout,))
    grads = jax.grad(lambda t: step.loss(t, frozen.params, tokens)[0])({"gist": gp})
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    opt = steps.make_optimizer(cfg.train)
    state = steps.init_state({"gist": gp}, opt)
    before_base = jax.tree.map(np.asarray, frozen.params)
    new_state, metrics = jax.jit(lambda s, b, t: step.update(opt, s, b, t, None))(
        state, frozen.params, tokens)
    assert set(new_state.params) == {"gist"}  # the base model is not trainable state
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp),
                            jax.tree.leaves(new_state.params["gist"])):
        assert not np.array_equal(a, b), f"{jax.tree_util.keystr(path)} did not change"
    for a, b in zip(jax.tree.leaves(before_base), jax.tree.leaves(frozen.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_cycling_step_trains_each_layout_in_turn(tiny):
    cfg, frozen, layout, tokens = tiny
    lod1 = scoring.GistLayout.build(cfg.mc, prefix_len=1088, horizon=cfg.mc.horizon,
                                   use_lod2=False)
    keep4 = scoring.GistLayout.build(cfg.mc, prefix_len=1088, horizon=cfg.mc.horizon,
                                    use_lod2=False, keep_raw_blocks=4)
    assert (layout.num_gists, lod1.num_gists, keep4.num_gists) == (1, 32, 29)
    gp = init_gist_params(cfg.gist, cfg.base_config.hidden_size, jax.random.key(5))
    opt = steps.make_optimizer(cfg.train)
    step = steps.GistStep(cfg, (layout, lod1, keep4), dense=True)
    update = jax.jit(lambda s, b, t: step.update(opt, s, b, t, None))
    state = steps.init_state({"gist": gp}, opt)
    seen = []
    for _ in range(4):
        expected = step.layouts[int(state.step) % 3]
        want = step.loss(state.params, frozen.params, tokens, expected)[1]["loss"]
        state, metrics = update(state, frozen.params, tokens)
        seen.append(int(metrics["layout"]))
        np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    assert seen == [0, 1, 2, 0]


def test_untrained_gists_start_at_the_base_embedding_scale(tiny):
    cfg, frozen, _, _ = tiny
    table = np.asarray(frozen.params["embed"]["embedding"]) * 7.0  # a scale that isn't 1
    base_params = {"embed": {"embedding": table}}
    rms = embedding_rms(base_params)
    np.testing.assert_allclose(rms, np.sqrt(np.mean(table ** 2)), rtol=1e-6)
    gp = init_params(cfg, "gist", base_params)
    children = jnp.asarray(table[np.random.default_rng(0).integers(0, 256, (5, 32))])
    gists = gist_blocks(gp, cfg.gist, children, 1)
    gist_rms = float(jnp.sqrt(jnp.mean(jnp.square(gists))))
    assert 0.5 * rms < gist_rms < 2.0 * rms, (gist_rms, rms)


def test_sharded_step_equals_single_device_step_with_declared_shardings(tiny):
    cfg, frozen, layout, _ = tiny
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, layout.window_len)))
    gp = init_gist_params(cfg.gist, cfg.base_config.hidden_size, jax.random.key(2))
    opt = steps.make_optimizer(cfg.train)
    step = steps.GistStep(cfg, (layout,))
    results = {}
    for name, shape in {"single": (1, 1), "mesh": (2, 4)}.items():
        mesh = sharding.make_mesh(shape)
        # a fresh copy: the train step donates (deletes) its input state
        state = steps.init_state({"gist": jax.tree.map(jnp.array, gp)}, opt)
        sh = steps.jit_step(step, opt, mesh, state, frozen.params, 4)
        out_state, metrics = sh.train(sh.place_state(state), sh.place_base(frozen.params),
                                      sh.place_batch(tokens), sh.place_rng(jax.random.key(0)))
        results[name] = (out_state, metrics, sh, mesh)
    s1, m1, _, _ = results["single"]
    s8, m8, sh8, mesh8 = results["mesh"]
    chex.assert_trees_all_close(jax.device_get(s1.params), jax.device_get(s8.params),
                                atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    for leaf, want in zip(jax.tree.leaves(s8), jax.tree.leaves(sh8.state_sharding)):
        assert leaf.sharding == want
    assert sh8.batch_sharding.spec[0] == "data" and mesh8.shape["model"] == 4
    assert m8["loss"].sharding.is_fully_replicated


def test_checkpoint_into_a_different_architecture_is_a_clear_error(tiny, tmp_path):
    cfg, _, _, _ = tiny
    ck = Checkpointer(tmp_path)
    state = {"w": jnp.ones((3,))}
    ck.save(1, state, {"epoch": 0, "cursor": 2}, cfg)
    ck.wait()
    restored, meta = ck.restore(state, cfg)
    assert meta["data_position"] == {"epoch": 0, "cursor": 2}
    other = override(cfg, {"gist.width": 48})
    with pytest.raises(CheckpointMismatchError, match=r"gist.width: checkpoint 36 vs requested 48"):
        ck.restore(state, other)
    ck.close()


def test_checkpoint_check_fills_fields_added_later_and_compares_only_the_nets_it_holds(tiny):
    cfg, _, _, _ = tiny
    saved = config_to_json(cfg)
    # A checkpoint written before LensNet v2's fields existed means LensNet v1 (their defaults).
    for field in ("query_tokens", "query_layer", "retrieval_features"):
        del saved["lens"][field]
    check_compatible(saved, cfg)
    with pytest.raises(CheckpointMismatchError, match=r"lens.query_tokens: checkpoint 0 vs "
                                                      r"requested 8"):
        check_compatible(saved, override(cfg, {"lens.query_tokens": 8}))
    # A GistNet-only train state is not checked against LensNet's architecture ...
    gist_only = steps.TrainState(step=jnp.zeros((), jnp.int32), params={"gist": {}},
                                 opt_state=())
    assert nets_in(gist_only) == ("gist",)
    other_lens = override(cfg, {"lens.num_latents": cfg.lens.num_latents + 2})
    check_compatible(config_to_json(cfg), other_lens, nets=nets_in(gist_only))
    # ... but it still is against GistNet's, and a state of unknown layout against both.
    with pytest.raises(CheckpointMismatchError, match="gist.width"):
        check_compatible(config_to_json(cfg), override(cfg, {"gist.width": 48}),
                         nets=nets_in(gist_only))
    with pytest.raises(CheckpointMismatchError, match="lens.num_latents"):
        check_compatible(config_to_json(cfg), other_lens, nets=nets_in({"w": 1}))


def _small(cfg, steps_=5):
    return override(cfg, {"train.steps": steps_, "train.checkpoint_every": 1,
                          "train.log_every": 1, "train.warmup_steps": 1})


def test_run_killed_with_sigkill_resumes_to_the_same_params(tmp_path):
    cfg = _small(get_config("tiny"))
    reference = train_gist(cfg, tmp_path / "ref", progress=False, eval_batches=0)["state"]

    workdir = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train_gist.py"), "--config",
           "tiny", "--workdir", str(workdir), "--eval-batches", "0",
           "--set", "train.steps=5", "--set", "train.checkpoint_every=1",
           "--set", "train.log_every=1", "--set", "train.warmup_steps=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if any(int(p.name) >= 2 for p in done):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = Checkpointer(workdir, create=False).latest_step()
    assert latest is not None and 2 <= latest < 5

    resumed = train_gist(cfg, workdir, progress=False, eval_batches=0)
    assert resumed["start_step"] == latest
    chex.assert_trees_all_close(jax.device_get(resumed["state"].params),
                                jax.device_get(reference.params), atol=1e-6)


def test_short_tiny_run_lowers_held_out_loss(tmp_path, tiny):
    cfg, frozen, _, _ = tiny
    cfg = override(cfg, {"train.steps": 30, "train.learning_rate": 3e-3,
                         "train.checkpoint_every": 30, "train.log_every": 10})
    result = train_gist(cfg, tmp_path, progress=False, eval_batches=1)
    # same held-out windows, same targets; the trained gists must do measurably better at
    # both levels (steps alternate between the LOD1-only and the LOD1+LOD2 layout)
    # LOD1: 32 gists, by >= 0.01 nats; LOD1+LOD2: one gist for 1,024 tokens after the sink,
    # whose whole span costs only ~0.007 nats on the random tiny base (truncation), so by a
    # quarter of its starting ΔNLL instead
    for name, margin in (("lod1+lod2_keep1", None), ("lod1_keep1", 0.01)):
        before, after = result["eval_before"][name], result["eval_after"][name]
        b, a = before["delta_nll_gistnet"], after["delta_nll_gistnet"]
        need = b - margin if margin is not None else b - 0.25 * abs(b)
        assert a < need, (name, before, after)
    # the metrics are also TensorBoard scalars
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    # every log step has a row for each of the two alternating layouts (log_every=10 is
    # even: logging only the logged step's metrics would show one layout only)
    assert [s for s, _ in scalars["train/loss"]] == [10, 10, 20, 20, 30, 30]
    assert [v for _, v in scalars["train/layout"]] == [0, 1] * 3
    assert [v for _, v in scalars["train/steps"]] == [5] * 6
    evals = scalars["eval/lod1_keep1/delta_nll_gistnet"]
    assert evals[0][0] == 0 and evals[-1][0] == 30
    np.testing.assert_allclose(evals[-1][1],
                               result["eval_after"]["lod1_keep1"]["delta_nll_gistnet"],
                               rtol=1e-6)


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Parse TFRecord-framed Event protos (length, crc, data, crc) from every events file."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    for path in files:
        buf = path.read_bytes()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            event = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_ema_params_are_the_moving_average_of_the_trained_params_and_survive_a_resume(
        tmp_path, tiny):
    from mcjax.assets import load_params_safetensors, read_card
    from mcjax.checkpoint import CheckpointError, restore_trained_params

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import export_gist

    cfg, frozen, _, _ = tiny
    plain = override(_small(cfg, 4), {"train.keep_checkpoints": 8})
    decay = 0.5
    ema_cfg = override(plain, {"train.ema_decay": decay})
    ref = train_gist(plain, tmp_path / "plain", progress=False, eval_batches=0)
    # interrupted after 2 steps and resumed: the average is part of the checkpointed state
    train_gist(ema_cfg, tmp_path / "ema", progress=False, eval_batches=0, stop_after=2)
    run = train_gist(ema_cfg, tmp_path / "ema", progress=False, eval_batches=0)
    assert run["start_step"] == 2
    assert "resumed_with_changed" not in (tmp_path / "ema" / "metrics.jsonl").read_text()
    # the average does not change training
    chex.assert_trees_all_close(jax.device_get(run["state"].params),
                                jax.device_get(ref["state"].params), atol=1e-6)

    # independent reference: the per-step params of the plain run averaged by hand
    expected = jax.device_get(init_params(frozen.cfg, "gist", frozen.params))
    for t in range(1, 5):
        p_t = restore_trained_params(tmp_path / "plain", t)[0]["gist"]
        d = min(decay, (1 + t) / (10 + t))
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), expected, p_t)
    ema = restore_trained_params(tmp_path / "ema", ema=True)[0]["gist"]
    chex.assert_trees_all_close(ema, expected, atol=1e-5)
    final = jax.device_get(ref["state"].params["gist"])
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(ema),
                                                      jax.tree.leaves(final)))

    # exported as a params-only file whose card says which weights it holds
    out = tmp_path / "g.safetensors"
    assert export_gist.main(["--workdir", str(tmp_path / "ema"), "--out", str(out),
                             "--ema", "--card-json", '{"note": "test"}']) == 0
    chex.assert_trees_all_close(load_params_safetensors(out), ema, atol=0)
    card = read_card(out)
    assert card["weights"] == "ema (decay 0.5)" and card["note"] == "test"
    assert card["step"] == 4
    # a checkpoint without an average says so; a resume that changes the decay is refused
    with pytest.raises(CheckpointError, match="no EMA"):
        restore_trained_params(tmp_path / "plain", ema=True)
    assert export_gist.main(["--workdir", str(tmp_path / "plain"), "--out", str(out),
                             "--ema"]) == 2
    with pytest.raises(ValueError, match="ema_decay"):
        train_gist(override(ema_cfg, {"train.steps": 6}), tmp_path / "plain", progress=False,
                   eval_batches=0)


def test_train_gist_and_train_joint_warm_start_from_a_params_file(tmp_path, tiny):
    from mcjax.assets import save_params_safetensors
    from mcjax.train.loop import train_joint

    cfg, frozen, _, _ = tiny
    cfg = override(_small(frozen.cfg, 1), {"train.learning_rate": 1e-9})
    start = jax.device_get(init_gist_params(cfg.gist, cfg.base_config.hidden_size,
                                            jax.random.key(21), block_size=cfg.mc.block_size))
    path = save_params_safetensors(start, tmp_path / "g.safetensors", {"part": "gist"})
    # lr 1e-9: one step leaves the warm start in place (far from the seed's own init)
    for name, run in (("gist", lambda: train_gist(cfg, tmp_path / "g", init_gist=path,
                                                  progress=False, eval_batches=0)),
                      ("joint", lambda: train_joint(cfg, tmp_path / "j", init_gist=path,
                                                    progress=False, eval_batches=0,
                                                    candidates=3))):
        got = jax.device_get(run()["state"].params["gist"])
        chex.assert_trees_all_close(got, start, atol=1e-6)
    other = override(cfg, {"gist.width": 48})
    with pytest.raises(CheckpointMismatchError, match="--init-gist .* do not match"):
        train_gist(other, tmp_path / "bad", init_gist=path, progress=False, eval_batches=0)


def test_a_resume_with_changed_train_settings_is_recorded_in_the_log(tmp_path, tiny, capsys):
    import json

    cfg, frozen, _, _ = tiny
    cfg = _small(frozen.cfg, 3)
    work = tmp_path / "run"
    train_gist(cfg, work, progress=False, eval_batches=0, stop_after=1)
    longer = override(cfg, {"train.steps": 4, "train.learning_rate": 2e-3})
    run = train_gist(longer, work, progress=False, eval_batches=0, stop_after=1)
    assert run["start_step"] == 1 and run["end_step"] == 2
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    changes = [r for r in rows if "resumed_with_changed_train_settings" in r]
    assert [r["step"] for r in changes] == [1]
    assert changes[0]["resumed_with_changed_train_settings"] == {
        "train.steps": {"was": 3, "now": 4},
        "train.learning_rate": {"was": cfg.train.learning_rate, "now": 2e-3}}
    assert "train.steps 3 -> 4" in capsys.readouterr().err
    # (an unchanged resume logs no such row: the EMA test's resume checks it)


def test_gistnet_trains_on_a_qwen_style_base_as_on_llama(tmp_path):
    """The training command is architecture-agnostic: a tiny Qwen3 base (q/k norms,
    head_dim != hidden/heads; the parity tests cover each switch) trains GistNet."""
    from mcjax.config import tiny_architectures

    llama = tiny_architectures()["qwen3"]
    cfg = override(dataclasses.replace(get_config("tiny"), base_config=llama),
                   {"train.steps": 3, "train.checkpoint_every": 3, "train.log_every": 1,
                    "train.eval_every": 3})
    result = train_gist(cfg, tmp_path, progress=False, eval_batches=1)
    state = result["state"]
    g0 = init_params(cfg, "gist", load_frozen(cfg).params)
    trained = state.params["gist"]
    assert jax.tree.structure(trained) == jax.tree.structure(g0)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(trained),
                                                      jax.tree.leaves(g0)))
    for layout in result["eval_after"].values():
        assert np.isfinite(layout["delta_nll_gistnet"])


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, tiny,
                                                                        capsys):
    """Build item 5 (issue 33): the latest checkpoint's files damaged, the run resumes from
    the one before and says so (stderr and the log), ending where an undamaged run ends."""
    import json

    cfg, frozen, _, _ = tiny
    cfg = _small(frozen.cfg, 3)
    work = tmp_path / "run"
    train_gist(cfg, work, progress=False, eval_batches=0, stop_after=2)
    for f in (work / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the arrays' data files
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0x10
            f.write_bytes(bytes(data))
    run = train_gist(cfg, work, progress=False, eval_batches=0)
    assert run["start_step"] == 1 and run["end_step"] == 3
    assert "resuming from step 1, the newest intact checkpoint; skipped damaged step 2" in \
        capsys.readouterr().err
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_past_damaged_checkpoints"][0]["step"] for r in rows
            if "resumed_past_damaged_checkpoints" in r] == [2]
