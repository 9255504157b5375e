"""Checkpoint evaluation (mcjax/eval, experiments/evaluate.py): metrics against hand
computations, paired ΔNLL statistics and gap recovered, passkey scoring, identical ΔNLL
targets, in-document held-out windows, params-only GistNet files, the random / recency
focus baselines, the sliding-window baseline, end-to-end runs on the tiny config and clear
errors for bad input.

Every session here uses the plan of the end-to-end run (tiny config, w_max 256, 2 streams,
max_tokens 2048), so the programs compile once for the whole file.
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import focus
from mcjax import working_context as wcm
from mcjax.base.generate import GreedySampler
from mcjax.checkpoint import Checkpointer
from mcjax.config import get_config, override
from mcjax import assets, nets
from mcjax.eval import baselines, metrics, report, tasks
from mcjax.runtime import Session, policy_scores, recency_scores, untrained_params
from mcjax import data
from mcjax.train import steps
from mcjax.scoring import byte_decode, load_frozen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import evaluate  # noqa: E402

CASES, LENGTHS, MAX_TOKENS = 2, (512, 1024), 2048  # the end-to-end run's plan


@pytest.fixture(scope="module")
def frozen():
    return load_frozen(get_config("tiny"))


@pytest.fixture(scope="module")
def cfg(frozen):
    return frozen.cfg  # tiny, base_config filled in


def _write_workdir(path, cfg, params, extra=None, step=2):
    """A training workdir as the trainers write it (TrainState with `params`, AdamW state,
    data position, config, run metadata), without spending a training run's compile time."""
    state = steps.init_state(params, steps.make_optimizer(cfg.train))
    ckpt = Checkpointer(path)
    ckpt.save(step, state, {"epoch": 0, "cursor": 0}, cfg, extra)
    ckpt.wait()
    ckpt.close()


def _write_gist_workdir(path, cfg, gist_params, step=2):
    """A train_gist workdir (no run metadata, {"gist": ...})."""
    _write_workdir(path, cfg, {"gist": gist_params}, None, step)


@pytest.fixture(scope="module")
def gist_workdir(tmp_path_factory, frozen, cfg):
    """A tiny train_gist workdir whose GistNet differs from the untrained init."""
    init = untrained_params(cfg, "gist", frozen.params)
    trained = jax.tree.map(lambda x: x * 1.5 + 0.01, init)
    path = tmp_path_factory.mktemp("gist_run")
    _write_gist_workdir(path, cfg, trained)
    return path, trained


# --------------------------------------------------------------------------- metrics


def test_correlations_and_sign_agreement_match_hand_computation():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # dx = (-1.5, -.5, .5, 1.5), dy = (-3, -1, 0, 4): Σdxdy = 11, Σdx² = 5, Σdy² = 26
    assert metrics.pearson(x, y) == pytest.approx(11 / np.sqrt(5 * 26))
    assert metrics.spearman(x, y) == pytest.approx(1.0)  # same order
    # ties get average ranks: x -> (1, 2.5, 2.5, 4), y -> (1, 3, 2, 4): r = 4.5 / √(4.5·5)
    np.testing.assert_allclose(metrics.rankdata([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # signs: pairs with both nonzero are 0 (agree), 1 and 3 (disagree); pair 2 has x = 0
    assert metrics.sign_agreement([1, -1, 0, 2], [0.5, 0.5, 1, -1]) == \
        (pytest.approx(1 / 3), 3)
    s = metrics.correlation_summary([1, -1, 0, 2], [0.5, 0.5, 1, -1])
    assert s["n"] == 4 and s["n_sign"] == 3 and s["degenerate"] is None


def test_degenerate_correlation_input_is_reported_not_nan():
    s = metrics.correlation_summary([0.3, 0.3, 0.3], [1.0, 2.0, 3.0])
    assert s["pearson"] is None and s["spearman"] is None
    assert s["degenerate"] == "x is constant"
    assert metrics.correlation_summary([1.0, 2.0], [5.0, 5.0])["degenerate"] == "y is constant"
    one = metrics.correlation_summary([1.0], [2.0])
    assert one["pearson"] is None and "fewer than 2" in one["degenerate"]
    assert metrics.sign_agreement([0, 0], [1, 2]) == (None, 0)
    with pytest.raises(ValueError, match="finite"):
        metrics.pearson([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="same number"):
        metrics.pearson([1.0, 2.0], [1.0])


def test_passkey_scoring_found_not_found_and_partial_digits():
    hit = metrics.score_passkey(" The pass key is 12345. Remember", "12345")
    assert hit.found and hit.predicted == "12345" and hit.digit_accuracy == 1.0
    miss = metrics.score_passkey(" I do not know.", "12345")
    assert not miss.found and miss.predicted == "" and miss.digits_correct == 0
    partial = metrics.score_passkey(" 12945 is it", "12345")
    assert not partial.found and partial.digits_correct == 4
    assert partial.digit_accuracy == pytest.approx(0.8)
    # the key must be a whole number, not part of a longer one
    assert not metrics.score_passkey("9912345", "12345").found
    assert metrics.score_passkey("key:12345!", "12345").found
    acc = metrics.accuracy([hit, miss, partial])
    assert acc["correct"] == 1 and acc["n"] == 3
    assert acc["accuracy"] == pytest.approx(1 / 3)
    assert acc["digit_accuracy"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert acc["ci95"] == list(metrics.wilson_interval(1, 3))
    with pytest.raises(ValueError, match="digit string"):
        metrics.score_passkey("123", "")


def test_wilson_interval_matches_the_closed_form_and_its_edge_cases():
    # 14/24: p = 0.5833; hand-computed Wilson 95 % bounds
    lo, hi = metrics.wilson_interval(14, 24)
    assert lo == pytest.approx(0.3883, abs=1e-3) and hi == pytest.approx(0.7551, abs=1e-3)
    lo, hi = metrics.wilson_interval(0, 24)
    assert lo == 0.0 and hi == pytest.approx(0.1380, abs=1e-3)  # never a zero-width interval
    assert metrics.wilson_interval(24, 24)[1] == pytest.approx(1.0)
    assert metrics.wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        metrics.wilson_interval(5, 4)


# --------------------------------------------------------------------------- ΔNLL@H


def test_every_delta_nll_variant_scores_the_same_next_token_targets(frozen, cfg):
    # the tiny base has 3 layers: read its hidden states after 2 for mean_pool_hidden
    frozen = dataclasses.replace(frozen, cfg=override(cfg, {"gist.input_layer": 2}))
    assert baselines.available_variants(frozen.cfg) == (baselines.NLL_VARIANTS, {})
    layouts = tasks.nll_layouts(cfg.mc, cfg.train.seq_len - cfg.mc.horizon, (1,))
    assert [s.name for s in layouts] == ["lod1_keep1", "lod1+lod2_keep1"]
    assert layouts[0].context_ratio < layouts[1].context_ratio
    lay = layouts[1].layout
    P, H = lay.prefix_len, lay.horizon
    gist = untrained_params(cfg, "gist", frozen.params)
    other = jax.tree.map(lambda x: x * 1.5 + 0.01, gist)
    tokens = np.random.default_rng(0).integers(3, 256, (2, cfg.train.seq_len)).astype(np.int32)
    base = baselines.window_variant_nll(frozen, other, gist, tokens, lay)
    assert set(base) == set(baselines.NLL_VARIANTS)
    for pos, col in ((P + H - 1, H - 1), (P, 0)):
        changed = tokens.copy()
        changed[:, pos] = (changed[:, pos] + 7) % 256
        new = baselines.window_variant_nll(frozen, other, gist, changed, lay)
        for v in baselines.NLL_VARIANTS:
            diff = np.abs(new[v] - base[v]) > 1e-6
            # target `col` is tokens[P + col] in every variant: it changes there ...
            assert diff[:, col].all(), (v, pos)
            if col == H - 1:  # ... and the last target is no variant's input
                assert not diff[:, :col].any(), v

    sweep = baselines.delta_nll_sweep(frozen, other, gist, [tokens], layouts)
    for row in sweep["layouts"]:
        assert row["delta_nll"]["full"]["mean"] == 0.0
        assert row["delta_nll"]["full"]["n"] == 2
        for v in baselines.NLL_VARIANTS:  # ΔNLL is NLL(variant) - NLL(full) per window
            assert row["delta_nll"][v]["mean"] == pytest.approx(
                row["nll"][v] - row["nll"]["full"], abs=1e-5)
    # truncation depends only on the raw tail: both layouts keep one block
    a, b = sweep["layouts"]
    assert a["nll"]["truncation"] == b["nll"]["truncation"]
    assert a["nll"]["gistnet"] != a["nll"]["gistnet_untrained"]


    assert {(r["layout"], r["variant"]) for r in sweep["paired"]} == {
        (lay.name, v) for lay in layouts for v in baselines.PAIRED_VARIANTS}


def test_paired_statistics_and_gap_recovered_match_hand_computation():
    full = [1.0, 2.0, 3.0, 4.0]
    trunc = [1.5, 2.5, 3.1, 4.9]  # ΔNLL_truncation per window (.5, .5, .1, .9): mean .5
    var = [1.2, 2.1, 3.0, 4.3]  # ΔNLL_variant (.2, .1, 0, .3): mean .15
    r = metrics.paired_vs_truncation(var, trunc, full)
    # d = var - trunc = (-.3, -.4, -.1, -.6): mean -.35, Σ(d - mean)² = .13
    assert r["n"] == 4
    assert r["mean_diff_vs_truncation"] == pytest.approx(-0.35)
    assert r["se"] == pytest.approx(np.sqrt(0.13 / 3) / 2)
    assert r["significant"]  # -.35 + 2 · .104 < 0
    assert r["delta_nll"] == pytest.approx(0.15)
    assert r["delta_nll_truncation"] == pytest.approx(0.5)
    # gap recovered 1 - .15 / .5 = .7; delta method: z = ((t - v) - .7 (t - f)) / .5
    # = (-.1, .1, .06, -.06), SE = sd(z) / 2
    assert r["gap_recovered"] == pytest.approx(0.7)
    assert r["gap_recovered_se"] == pytest.approx(np.sqrt(0.0272 / 3) / 2)
    assert r["gap_note"] is None
    # truncation against itself: the reference row
    t = metrics.paired_vs_truncation(trunc, trunc, full)
    assert t["mean_diff_vs_truncation"] == 0 and t["se"] == 0 and t["gap_recovered"] == 0
    assert not t["significant"]
    # the full context recovers the whole gap; a noisy small gain is not significant
    assert metrics.paired_vs_truncation(full, trunc, full)["gap_recovered"] == pytest.approx(1)
    noisy = metrics.paired_vs_truncation([1.6, 2.0, 3.3, 4.4], trunc, full)
    assert noisy["mean_diff_vs_truncation"] < 0 and not noisy["significant"]
    # no gap to recover: undefined, and said so
    none = metrics.paired_vs_truncation(var, full, full)
    assert none["gap_recovered"] is None and "undefined" in none["gap_note"]
    one = metrics.paired_vs_truncation([1.0], [2.0], [0.5])
    assert one["se"] is None and not one["significant"]
    with pytest.raises(ValueError, match="align"):
        metrics.paired_vs_truncation([1.0, 2.0], [1.0], [1.0])

    # rows of a hand-made per-window table: every (layout, variant) against truncation
    spec = tasks.nll_layouts(get_config("tiny").mc, 1088, (1,))[0]
    nll = {"full": np.asarray(full), "truncation": np.asarray(trunc),
           "gistnet": np.asarray(var), "mean_pool": np.asarray(full) + 1}
    pw = baselines.PerWindowNLL(layouts=[spec], variants=tuple(nll), nll={spec.name: nll},
                                tokens_nll={spec.name: {k: v[:, None] for k, v in nll.items()}},
                                window_len=1104)
    rows = baselines.paired_rows(pw)
    assert [r["variant"] for r in rows] == ["gistnet", "mean_pool", "truncation"]
    g = rows[0]
    assert g["layout"] == spec.name and g["n"] == 4
    assert g["gap_recovered"] == pytest.approx(0.7) and g["se"] == pytest.approx(r["se"])
    assert rows[1]["gap_recovered"] == pytest.approx(1 - 1 / 0.5)  # worse than truncation
    assert set(pw.arrays()) == {f"{k}/{spec.name}/{v}" for k in ("nll", "nll_tokens")
                                for v in nll}


def test_keep_raw_1_4_17_gives_exactly_the_four_named_layouts():
    for name in ("tiny", "smollm2_135m_cpu"):  # both: 1,088-token prefixes, 1-block sink
        c = get_config(name)
        specs = tasks.nll_layouts(c.mc, c.train.seq_len - c.mc.horizon, (1, 4, 17))
        assert sorted(s.name for s in specs) == sorted(
            ["lod1_keep1", "lod1_keep4", "lod1_keep17", "lod1+lod2_keep1"]), name
        by = {s.name: s.layout for s in specs}
        assert by["lod1_keep1"].num_gists == 32 and by["lod1_keep1"].lod2_groups == 0
        assert by["lod1+lod2_keep1"].num_gists == 1
        assert by["lod1_keep17"].num_gists == 16 and by["lod1_keep17"].sink_blocks == 1
        assert [s.name for s in tasks.layouts_by_name(
            c.mc, 1088, ["lod1+lod2_keep1", "lod1_keep4"])] == ["lod1+lod2_keep1", "lod1_keep4"]
    mc = get_config("tiny").mc
    with pytest.raises(tasks.EvalInputError, match="not of the form"):
        tasks.layouts_by_name(mc, 1088, ["lod2_keep1"])
    with pytest.raises(tasks.EvalInputError, match="do not exist"):
        tasks.layouts_by_name(mc, 1088, ["lod1+lod2_keep4"])  # 29 blocks: no LOD2 group
    with pytest.raises(tasks.EvalInputError, match="leave nothing to compress"):
        tasks.nll_layouts(mc, 1088, (33,))  # 34 blocks, one is the sink


def _hand_corpus(lengths, sep=0):
    """Documents whose tokens name their document: doc d holds 100·(d+1) + i."""
    pieces, starts, off = [], [], 0
    for d, n in enumerate(lengths):
        starts.append(off)
        pieces += [np.arange(n, dtype=np.int32) % 100 + 100 * (d + 1), np.asarray([sep], np.int32)]
        off += n + 1
    return data.TokenizedCorpus(np.concatenate(pieces), np.asarray(starts, np.int64),
                                tuple(f"doc{d}" for d in range(len(lengths))))


def test_held_out_windows_never_cross_documents_and_too_few_is_a_clear_error():
    lengths = [5, 23, 12, 40, 10]  # windows of 10: 0 + 2 + 1 + 4 + 1 = 8
    corpus = _hand_corpus(lengths)
    got = data.document_windows(corpus, 10, 8, seed=3)
    assert got.shape == (8, 10)
    assert not (got == 0).any()  # never a separator
    assert all(len(set(w // 100)) == 1 for w in got)  # one document each
    where = tasks.locate_windows(corpus, got)
    assert (where["offset"] >= 0).all()
    for w, doc, off in zip(got, where["doc"], where["doc_offset"]):
        assert 0 <= off and off + 10 <= lengths[doc] and (w // 100 == doc + 1).all()
    assert list(where["doc_id"]) == [f"doc{d}" for d in where["doc"]]
    # a smaller sample is contained in a larger one (the ceiling's windows are ΔNLL windows)
    small = data.document_windows(corpus, 10, 3, seed=3)
    assert {w.tobytes() for w in small} <= {w.tobytes() for w in got}
    np.testing.assert_array_equal(data.document_windows(corpus, 10, 8, seed=3), got)
    with pytest.raises(data.DataError, match="fewer than"):
        data.document_windows(corpus, 10, 9)
    with pytest.raises(data.DataError, match="fewer than"):
        data.document_windows(corpus, 41, 1)  # no document holds 41 tokens


def test_window_count_not_a_multiple_of_the_batch_is_padded_and_dropped(frozen, cfg):
    layouts = tasks.nll_layouts(cfg.mc, cfg.train.seq_len - cfg.mc.horizon, (4,))
    gist = untrained_params(cfg, "gist", frozen.params)
    windows = np.random.default_rng(5).integers(3, 256, (3, cfg.train.seq_len)).astype(np.int32)
    a = baselines.per_window_nll(frozen, gist, gist, windows, layouts, batch_size=2)
    b = baselines.per_window_nll(frozen, gist, gist, windows, layouts, batch_size=3)
    assert a.num_windows == 3 and not a.skipped  # tiny reads its hidden states after 2 of 3 layers
    for v in a.variants:
        np.testing.assert_allclose(a.nll["lod1_keep4"][v], b.nll["lod1_keep4"][v], atol=1e-5)
    chunks = tasks.batches_of(windows, 2)
    assert [c.shape[0] for c, _ in chunks] == [2, 2] and [r for _, r in chunks] == [2, 1]
    np.testing.assert_array_equal(chunks[1][0][1], windows[2])  # padded with the last window


# --------------------------------------------------------------------------- params files


def test_params_safetensors_round_trip_card_and_export(tmp_path, frozen, cfg, gist_workdir):
    params = gist_workdir[1]
    path = tmp_path / "g.safetensors"
    assets.save_gist_params(params, cfg, path, step=2, command="test")
    back = assets.load_params_safetensors(path)
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)  # noqa: E731
                      for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert flat(back).keys() == flat(params).keys()
    for k, v in flat(params).items():
        np.testing.assert_array_equal(flat(back)[k], v)
    card = assets.read_card(path)
    assert card["part"] == "gist" and card["step"] == 2
    assert assets.apply_card(cfg, card) == cfg
    nets.check_params(back, cfg, "gist")

    other = assets.apply_card(cfg, {"config": {"gist": {**card["config"]["gist"],
                                                        "width": 24}, "mc": {}}})
    assert other.gist.width == 24
    with pytest.raises(assets.CheckpointMismatchError, match="do not match"):
        nets.check_params(back, other, "gist")
    with pytest.raises(assets.CheckpointMismatchError, match="mc.block_size"):
        assets.apply_card(cfg, {"config": {"gist": {}, "mc": {"block_size": 16}}})
    with pytest.raises(assets.AssetError, match="unknown fields"):
        assets.gist_config_from_card({"config": {"gist": {"nope": 1}, "mc": {}}})
    (tmp_path / "bare.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(assets.AssetError, match="no card"):
        assets.read_card(tmp_path / "bare.safetensors")
    with pytest.raises(assets.AssetError, match="does not exist"):
        assets.load_params_safetensors(tmp_path / "nope.safetensors")

    out, card_file = nets.export_gist_params(gist_workdir[0], tmp_path / "e.safetensors")
    exported = json.loads(card_file.read_text())
    assert exported["source"]["step"] == 2 and exported["config"]["name"] == "tiny"
    for k, v in flat(params).items():
        np.testing.assert_array_equal(flat(assets.load_params_safetensors(out))[k], v)


# --------------------------------------------------------------------------- focus baselines


def test_random_focus_is_deterministic_for_a_seed_and_differs_across_seeds_and_refocuses(
        frozen, cfg):
    from mcjax.runtime import Plan

    plan = Plan(llama=cfg.base_config, mc=cfg.mc, lens=cfg.lens, batch_size=1,
                 max_tokens=MAX_TOKENS, pad_id=0, headroom=0, prefill_chunk=cfg.mc.block_size,
                 focus_policy="random")
    wc = wcm.initial_layout(3000, cfg.mc)

    def scores(seed, step, stream=0, call=1):
        return np.asarray(policy_scores(plan, jnp.uint32(seed), None, wc.replace(
            step=jnp.int32(step)), None, stream, call))

    np.testing.assert_array_equal(scores(3, 5), scores(3, 5))
    assert not np.array_equal(scores(3, 5), scores(4, 5))  # another seed
    assert not np.array_equal(scores(3, 5), scores(3, 6))  # the next refocus
    assert not np.array_equal(scores(3, 5), scores(3, 5, stream=1))
    s = scores(3, 5)
    legal = np.asarray(wc.valid)
    assert np.all(np.abs(s) < 1) and np.all(s[~legal] == 0)
    assert np.all(s[np.asarray(wc.level) == 0] <= 0)  # raw tokens never score "expand"

    # the same through whole sessions: actions repeat for a seed and change with it
    history = np.random.default_rng(1).integers(3, 256, (CASES, 1500))

    def actions(seed):
        s = Session((cfg.base_config, frozen.params), None, None, cfg, batch_size=CASES,
                    max_tokens=MAX_TOKENS, focus_policy="random", focus_seed=seed)
        assert s.untrained == ("gist",)  # LensNet is not used by the random policy
        for lo, hi in tasks.feed_schedule(1500, cfg.mc.block_size, 3):
            s.feed(list(history[:, lo:hi]))
            s.sync()
        return [e.actions for e in s.events], s.working_context.node

    a, nodes_a = actions(0)
    b, nodes_b = actions(0)
    c, _ = actions(1)
    assert a == b and np.array_equal(nodes_a, nodes_b)
    assert sum(len(x) for e in a for x in e) > 0  # random focus does act
    assert a != c


def test_recency_focus_collapses_the_oldest_and_expands_the_newest(cfg):
    # K = 32, w_max = 256, recent_protect = 64; no sink: the history's first block is a
    # gist here (the recency ordering is the point, the sink has its own tests)
    mc = dataclasses.replace(cfg.mc, sink_blocks=0)
    K = mc.block_size
    entries = ([(1, n) for n in range(2 * K)]  # two complete LOD1 sibling groups
               + [(0, t) for t in range(2 * K * K, 2 * K * K + 160)])  # 160 raw tokens
    T = 2 * K * K + 160
    wc = wcm.from_entries(entries, T, mc)
    s = np.asarray(recency_scores(wc, mc))
    n = len(entries)
    assert s[0] == s[:n].min() and s[0] < -0.9  # the oldest span scores toward collapse
    gists = slice(0, 2 * K)
    assert np.all(np.diff(s[gists]) > 0)  # newer gists score higher
    assert np.all(s[2 * K:n] <= 0)  # raw tokens cannot expand (masked)
    assert np.all(s[n:] == 0)

    new, info = focus.allocate(wc, jnp.asarray(s), mc)
    wcm.check_invariants(new, None, mc)
    heads = np.flatnonzero(np.asarray(info.collapse_heads))
    expanded = np.flatnonzero(np.asarray(info.expand_mask))
    assert heads.tolist() == [0]  # the oldest LOD1 group became one LOD2 gist
    assert sorted(expanded.tolist()) == [2 * K - 2, 2 * K - 1]  # the two newest gists
    got = wcm.to_entries(new)
    assert got[0][:2] == (2, 0)
    # the raw tail is untouched: the newest tokens stay LOD0
    assert [e[:2] for e in got[-160:]] == [(0, t) for t in range(T - 160, T)]


def test_sliding_window_equals_plain_greedy_on_the_last_w_max_tokens(frozen, cfg):
    W, n = cfg.mc.w_max, 6
    rng = np.random.default_rng(2)
    histories = [rng.integers(3, 256, 600), rng.integers(3, 256, 300)]
    out = baselines.sliding_window_generate(cfg.base_config, frozen.params, histories, W, n)
    sampler = GreedySampler(cfg.base_config, max_new_tokens=n, max_prompt_len=W)
    for b, h in enumerate(histories):
        ref, _ = sampler.generate(frozen.params, np.asarray(h[-W:])[None])
        assert out[b].tolist() == ref[0].tolist()


def test_full_context_fit_skips_explicitly_past_positions_or_memory():
    llama = get_config("tiny").base_config
    batch, why = baselines.full_context_fit(llama, 1000, 10, 4, 8 * 2**30)
    assert batch == 4 and why is None
    batch, why = baselines.full_context_fit(llama, llama.max_position_embeddings, 10, 4,
                                            8 * 2**30)
    assert batch == 0 and why.startswith("does not fit") and "positions" in why
    batch, why = baselines.full_context_fit(llama, 2000, 10, 4, 1e6)
    assert batch == 0 and "memory limit" in why


def test_feed_schedule_feeds_the_bulk_then_one_block_per_refocus():
    assert tasks.feed_schedule(1000, 32, 2) == [(0, 936), (936, 968), (968, 1000)]
    assert tasks.feed_schedule(40, 32, 5) == [(0, 8), (8, 40)]
    assert tasks.feed_schedule(100, 32, 0) == [(0, 100)]


def test_passkey_cases_have_the_exact_length_and_spread_needles(frozen):
    cases = tasks.passkey_cases(frozen.encode, 700, 4, seed=0)
    assert all(len(c.tokens) == 700 for c in cases)
    starts = [c.needle_span[0] for c in cases]
    assert starts == sorted(starts) and starts[0] < 200 and starts[-1] > 400
    for c in cases:
        lo, hi = c.needle_span
        assert c.key in byte_decode(c.tokens[lo:hi])
    again = tasks.passkey_cases(frozen.encode, 700, 4, seed=0)
    assert [c.key for c in cases] == [c.key for c in again]


def test_focus_recall_asks_whether_some_answer_occurrence_is_wholly_raw():
    # a hand-built WC: the sink block raw, one LOD2 gist, LOD1 gists, a raw stretch
    runs = [(0, 0, 32, 32), (2, 0, 1024, 1), (1, 1024, 1536, 16), (0, 1536, 1600, 64)]
    assert metrics.focus_recall(runs, [[1540, 1541, 1599]])
    assert metrics.focus_recall(runs, [[3, 4]])
    assert not metrics.focus_recall(runs, [[1535, 1536]])  # one token inside a gist
    assert metrics.focus_recall(runs, [[1535, 1536], [1560, 1561]])  # the second one
    assert not metrics.focus_recall(runs, [[100], [1600]])  # a gist; past the WC
    assert not metrics.focus_recall(runs, [[]]) and not metrics.focus_recall(runs, [])


def test_answer_positions_are_the_needles_key_occurrences(frozen):
    for c in tasks.passkey_cases(frozen.encode, 700, 3, seed=1):
        occurrences = tasks.answer_positions(c, byte_decode)
        lo, hi = c.needle_span
        assert occurrences
        for pos in occurrences:  # byte tokens: exactly the key's characters, in order
            assert lo <= pos.min() and pos.max() < hi
            assert byte_decode(c.tokens[pos]) == c.key


@pytest.mark.parametrize("task", [t for t in tasks.PASSKEY_TASKS if t != "passkey"])
def test_lookalike_cases_place_the_asked_value_where_their_answer_spans_say(frozen, task):
    cases = tasks.passkey_cases(frozen.encode, 900, 3, seed=2, task=task, num_needles=5)
    again = tasks.passkey_cases(frozen.encode, 900, 3, seed=2, task=task, num_needles=5)
    assert [c.key for c in cases] == [c.key for c in again]
    for c in cases:
        assert len(c.tokens) == 900 and c.answer_spans
        text = byte_decode(c.tokens)
        for a, b in c.answer_spans:  # byte tokens: the span is exactly the asked value
            assert byte_decode(c.tokens[a:b]) == c.key
            assert c.needle_span[0] <= a and b <= c.needle_span[1]
        assert text.count(c.key) == 1  # the asked value once; the question never says it
        question = text[text.rindex("\n"):]
        if task in ("multikey_word", "multikey_number", "near_duplicate"):
            assert text.count("special magic number for") == 5 + 2  # needles, question
            asked = question.split("for ")[1].split("?")[0]
            keys = [t.split(" is")[0] for t in text.split("special magic number for ")[1:-2]]
            assert asked in keys and len(set(keys)) == 5
            if task == "near_duplicate":  # one stem, keys differing in their last letter
                assert len({k[:-1] for k in keys}) == 1
        if task == "split":
            a, _ = c.answer_spans[0]
            assert a - c.needle_span[0] >= tasks.SPLIT_GAP_TOKENS
        if task == "paraphrase":
            needle = byte_decode(c.tokens[slice(*c.needle_span)])
            assert not set(needle.lower().split()) & set(question.lower().split()) - {
                "the", "is", "a", "of", "that", "those", "what", "which", "one", "can"}
    with pytest.raises(tasks.EvalInputError, match="too short"):
        tasks.passkey_cases(frozen.encode, 60, 1, seed=0, task=task)
    assert tasks.answer_positions(cases[0], byte_decode)[0].tolist() == list(
        range(*cases[0].answer_spans[0]))


def test_unknown_passkey_task_is_a_clear_error(frozen):
    with pytest.raises(tasks.EvalInputError, match="unknown passkey task"):
        tasks.passkey_cases(frozen.encode, 900, 1, seed=0, task="multikey")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, gist_workdir):
    out = tmp_path_factory.mktemp("eval_out")
    # 0.02 GiB: the 512-token full-context prefill fits (batch 1), the 1024-token one not
    argv = ["--config", "tiny", "--checkpoint", str(gist_workdir[0]), "--out", str(out),
            "--lengths", ",".join(map(str, LENGTHS)), "--cases", str(CASES),
            "--nll-batches", "1", "--focus-batches", "1", "--keep-raw", "1",
            "--refocus-steps", "2",
            "--full-memory-gb", "0.02", "--no-progress"]
    assert evaluate.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_evaluate_cli_writes_every_method_and_baseline_report_and_plots(e2e):
    out, res = e2e
    meta = res["meta"]
    assert meta["untrained"] == ["lens"]  # a train_gist workdir leaves LensNet untrained
    assert meta["networks"]["gist"]["source"] == "checkpoint"
    assert meta["networks"]["notes"]["checkpoint_run"] == "train_gist"
    assert "--checkpoint" in meta["command"] and meta["config"]["name"] == "tiny"

    nll = res["delta_nll"]
    assert [r["name"] for r in nll["layouts"]] == ["lod1_keep1", "lod1+lod2_keep1"]
    for row in nll["layouts"]:
        assert set(row["delta_nll"]) == {"full", "gistnet", "gistnet_untrained", "mean_pool",
                                         "mean_pool_hidden", "truncation"}
        assert row["delta_nll"]["full"]["mean"] == 0.0
        assert row["context_ratio"] > 1 and np.isfinite(row["nll"]["full"])
        assert row["delta_nll"]["gistnet"]["mean"] != row["delta_nll"]["gistnet_untrained"][
            "mean"]  # the checkpoint's GistNet, not the init

    pk = res["passkey"]
    assert pk["w_max"] == 256 and pk["lengths"] == list(LENGTHS)
    assert set(pk["methods"]) == {"megacontext_lens", "megacontext_random",
                                  "megacontext_recency", "megacontext_retrieval",
                                  "sliding_window", "full_context"}
    for method, per in pk["methods"].items():
        assert set(per) == {str(L) for L in LENGTHS}, method
        for L, row in per.items():
            if method == "full_context" and L == "1024":
                assert row["status"].startswith("skipped: does not fit")
                continue
            assert row["status"] == "ok", (method, L, row["status"])
            assert row["n"] == CASES and 0 <= row["accuracy"] <= 1
            lo, hi = row["ci95"]
            assert lo <= row["accuracy"] <= hi and hi > lo
            assert len(row["examples"]) == CASES
            assert all(len(ex["key"]) == 5 for ex in row["examples"])
    assert pk["methods"]["megacontext_lens"]["1024"]["refocuses"] == 3  # bulk + 2 blocks
    for method in ("megacontext_lens", "megacontext_retrieval"):  # recall beside accuracy
        row = pk["methods"][method]["1024"]
        assert len(row["answer_raw"]) == CASES and row["focus_recall"] == sum(row["answer_raw"])
    assert "focus_recall" not in pk["methods"]["sliding_window"]["1024"]
    assert "whole number" in pk["scoring"]

    fq = res["focus_quality"]
    assert set(fq["scorers"]) == {"lens", "retrieval", "recency", "random"}
    assert fq["candidates"] > 2 and fq["candidates"] == fq["scorers"]["lens"]["vs_value"]["n"]

    fm = res["focus_map"]
    assert fm["length"] == 1024 and len(fm["snapshots"]) == 3  # the refocuses up to the answer
    last = fm["snapshots"][-1]
    assert last["runs"][0][1] == 0 and last["runs"][-1][2] == last["num_tokens"] == 1024

    report = (out / "report.md").read_text()
    assert "LensNet: UNTRAINED" in report and "GistNet: trained" in report
    assert "skipped: does not fit" in report and "Focus recall:" in report
    for name in ("accuracy_vs_length.png", "dnll_vs_ratio.png", "focus_map.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
        assert f"]({name})" in report


@pytest.fixture(scope="module")
def dnll_run(tmp_path_factory, cfg, gist_workdir):
    """evaluate.py --only dnll,ceiling on a params-only GistNet file whose card reads the
    tiny base's hidden states after 2 layers (so mean_pool_hidden runs too)."""
    d = tmp_path_factory.mktemp("dnll")
    params = d / "gist.safetensors"
    assets.save_gist_params(gist_workdir[1], override(cfg, {"gist.input_layer": 2}), params,
                            step=2)
    out = d / "out"
    argv = ["--config", "tiny", "--gist-params", str(params), "--out", str(out),
            "--only", "dnll,ceiling", "--windows", "3", "--nll-batch-size", "2",
            "--keep-raw", "1", "--ceiling-windows", "2", "--ceiling-steps", "12",
            "--no-progress"]
    assert evaluate.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_evaluate_only_dnll_writes_paired_rows_and_per_window_nlls(dnll_run):
    out, res = dnll_run
    assert res["meta"]["networks"]["gist"]["source"] == "params_file"
    assert res["meta"]["config"]["gist"]["input_layer"] == 2  # from the card
    assert "passkey" not in res and "focus_quality" not in res
    rows = res["dnll_paired"]
    names = ["lod1_keep1", "lod1+lod2_keep1"]
    assert [(r["layout"], r["variant"]) for r in rows] == [
        (n, v) for n in names for v in ("gistnet", "gistnet_untrained", "mean_pool",
                                        "mean_pool_hidden", "truncation")]
    for r in rows:
        assert {"layout", "variant", "n", "mean_diff_vs_truncation", "se", "gap_recovered",
                "delta_nll", "delta_nll_se", "significant"} <= set(r)
        assert r["n"] == 3 and r["se"] is not None and np.isfinite(r["delta_nll"])
    by = {(r["layout"], r["variant"]): r for r in rows}
    t = by[("lod1_keep1", "truncation")]
    assert t["mean_diff_vs_truncation"] == 0 and (t["gap_recovered"] in (0, None))
    assert by[("lod1_keep1", "gistnet")]["delta_nll"] != by[("lod1_keep1",
                                                             "gistnet_untrained")]["delta_nll"]
    nll = res["delta_nll"]
    assert nll["windows"] == 3 and nll["batch_size"] == 2 and not nll["skipped_variants"]
    for row in nll["layouts"]:  # the summary agrees with the paired rows
        g = by[(row["name"], "gistnet")]
        assert row["delta_nll"]["gistnet"]["mean"] == pytest.approx(g["delta_nll"], abs=1e-6)

    with np.load(out / "per_window_nll.npz") as z:
        assert z["nll/lod1_keep1/gistnet"].shape == (3,)
        assert z["nll_tokens/lod1_keep1/gistnet"].shape == (3, 16)  # H = 16
        assert (z["window/offset"] >= 0).all() and all(z["window/doc_id"])
        d = z["nll/lod1_keep1/gistnet"] - z["nll/lod1_keep1/truncation"]
        assert d.mean() == pytest.approx(by[("lod1_keep1", "gistnet")][
            "mean_diff_vs_truncation"], abs=1e-6)
    report = (out / "report.md").read_text()
    assert "Paired against truncation" in report and "GistNet: trained" in report
    assert "Only 3 windows" in report and "per_window_nll.npz" in report
    # only the measured section's plot is written, and listed
    assert (out / "dnll_vs_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("accuracy_vs_length.png", "focus_map.png"):
        assert not (out / name).exists() and name not in res["files"] and name not in report


def test_a_report_rewritten_into_a_directory_removes_plots_of_sections_it_did_not_measure(
        dnll_run, tmp_path):
    out, res = dnll_run
    stale = tmp_path / "focus_map.png"
    stale.write_bytes(b"from an earlier run")
    res = json.loads((out / "results.json").read_text())
    paths = report.write_outputs(res, tmp_path)
    assert not stale.exists() and "focus_map" not in paths
    assert (tmp_path / "dnll_vs_ratio.png").exists() and "dnll_vs_ratio" in paths


def test_evaluate_dnll_with_chosen_variants_scores_only_those_on_the_same_windows(
        tmp_path, dnll_run):
    """--variants gistnet: full and truncation still run (the pairing needs them), nothing
    else does, and the numbers equal the all-variant run's on the same windows."""
    out_all, _ = dnll_run
    out = tmp_path / "out"
    argv = ["--config", "tiny", "--gist-params", str(out_all.parent / "gist.safetensors"),
            "--out", str(out), "--only", "dnll", "--windows", "3", "--nll-batch-size", "2",
            "--keep-raw", "1", "--variants", "gistnet", "--no-progress"]
    assert evaluate.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert {(r["layout"], r["variant"]) for r in res["dnll_paired"]} == {
        (n, v) for n in ("lod1_keep1", "lod1+lod2_keep1") for v in ("gistnet", "truncation")}
    with np.load(out / "per_window_nll.npz") as z, np.load(out_all / "per_window_nll.npz") as w:
        assert not any("mean_pool" in k or "untrained" in k for k in z.files)
        np.testing.assert_array_equal(z["window/offset"], w["window/offset"])
        for v in ("full", "gistnet", "truncation"):
            np.testing.assert_allclose(z[f"nll/lod1_keep1/{v}"], w[f"nll/lod1_keep1/{v}"],
                                       atol=1e-6)
    assert "gistnet" in (out / "report.md").read_text()


def test_evaluate_only_ceiling_pairs_free_vectors_with_truncation(dnll_run):
    out, res = dnll_run
    c = res["ceiling"]
    assert c["windows"] == 2 and [r["layout"] for r in c["layouts"]] == ["lod1_keep1"]
    row = c["layouts"][0]
    assert row["n"] == 2 and row["steps"] == 12 and row["lod1_gists"] == 32
    assert row["kl_ceiling"]["mean"] < row["kl_start"]["mean"]
    for k in ("ceiling", "start", "gistnet"):
        assert {"mean_diff_vs_truncation", "se", "gap_recovered", "delta_nll"} <= set(row[k])
    with np.load(out / "ceiling_per_window.npz") as z, \
            np.load(out / "per_window_nll.npz") as w:
        assert z["lod1_keep1/kl_curve"].shape == (len(row["curve"]["steps"]), 2)
        # the ceiling's windows are ΔNLL windows; its start is the mean_pool baseline there
        at = [list(w["window/offset"]).index(o) for o in z["window/offset"]]
        np.testing.assert_allclose(z["lod1_keep1/nll_init"],
                                   w["nll/lod1_keep1/mean_pool"][at], atol=1e-4)
        np.testing.assert_allclose(z["lod1_keep1/nll_truncation"],
                                   w["nll/lod1_keep1/truncation"][at], atol=1e-4)
        np.testing.assert_allclose(z["lod1_keep1/nll_gistnet"],
                                   w["nll/lod1_keep1/gistnet"][at], atol=1e-4)
    report = (out / "report.md").read_text()
    assert "## Ceiling" in report and "ceiling_per_window.npz" in report


def test_focus_grid_gives_the_finest_lod_per_bucket():
    from mcjax.eval.report import focus_grid

    snaps = [{"runs": [[1, 0, 256, 8], [0, 256, 288, 32]], "num_tokens": 288},
             {"runs": [[2, 0, 1024, 1], [0, 1024, 1100, 76]], "num_tokens": 1100}]
    grid = focus_grid(snaps, 1100, 11)  # buckets of 100 tokens
    assert grid[0, :2].tolist() == [1, 1] and grid[0, 2] == 0  # [200, 300) holds raw tokens
    assert np.isnan(grid[0, 3:]).all()  # not yet in the history
    assert (grid[1, :10] == 2).all() and grid[1, 10] == 0
    assert grid[1, 9] == 2  # [900, 1000) lies inside the LOD2 span


# --------------------------------------------------------------------------- bad input


def _fails(capsys, argv, match, one_line=False):
    """Exit status 2 (returned, or from an argument check before any work) and stderr
    holding `match` (`one_line`: in one line, all of stderr)."""
    try:
        code = evaluate.main(["--config", "tiny", "--no-progress"] + argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not one_line or len(err.strip().splitlines()) == 1, err


def test_bad_input_gives_clear_errors(capsys, tmp_path, gist_workdir):
    out = ["--out", str(tmp_path / "o")]
    ck = ["--checkpoint", str(gist_workdir[0])]
    _fails(capsys, ["--checkpoint", str(tmp_path / "nope")] + out, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["--checkpoint", str(tmp_path / "empty")] + out, "no checkpoints under")
    _fails(capsys, ck + out + ["--lengths", ""], "empty list")
    _fails(capsys, ck + out + ["--lengths", "128,1024"], "do not exceed W_max=256")
    _fails(capsys, ck + out + ["--lengths", "1024", "--w-max", "300"], "multiple of the block")
    _fails(capsys, out, "--untrained")  # neither a checkpoint nor --untrained
    _fails(capsys, ck + out + ["--untrained"], "not both")
    _fails(capsys, ck + out + ["--keep-raw", "40"], "leave nothing to compress")
    _fails(capsys, ck + out + ["--only", "bogus"], "sections must be")
    _fails(capsys, ck + out + ["--only", "passkey", "--methods", "megacontext_lens,oracle"],
           "--methods must name distinct methods")
    _fails(capsys, ck + out + ["--only", "dnll", "--windows", "0"], "--windows must be >= 1")
    _fails(capsys, ck + out + ["--only", "dnll", "--variants", "gistnet,oracle"],
           "unknown --variants ['oracle']")
    _fails(capsys, ck + out + ["--only", "ceiling", "--ceiling-layouts", "lod2_keep1"],
           "not of the form")
    _fails(capsys, ck + out + ["--only", "ceiling", "--ceiling-steps", "0"], "steps must be")
    _fails(capsys, ["--gist-params", str(tmp_path / "nope.safetensors")] + out,
           "does not exist")
    _fails(capsys, ck + out + ["--only", "dnll", "--windows", "100000"], "fewer than")
    assert not (tmp_path / "o").exists()  # nothing written on failure


def test_arguments_are_checked_before_the_evaluation_starts(capsys, tmp_path, monkeypatch,
                                                          gist_workdir):
    """Issue 33: `--out EXISTING_FILE` ran the whole evaluation, then died with a
    traceback; now it and the other argument errors exit 2 with one line before any
    work (the pipeline is never called)."""
    from mcjax.eval import pipeline

    def no_work(*a, **k):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(pipeline, "run_evaluation", no_work)

    def bad(argv, match):
        _fails(capsys, argv, match, one_line=True)

    ck = ["--checkpoint", str(gist_workdir[0])]
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    bad(ck + ["--out", str(existing)], "exists and is not a directory")
    bad(ck + ["--out", str(existing / "sub")], "cannot be created")
    out = ["--out", str(tmp_path / "o")]
    bad(ck + out + ["--set", "nosuch.x=1"], "unknown field 'nosuch'")
    bad(ck + out + ["--set", "train.steps=-3"], "train.steps must be >= 1")
    bad(ck + out + ["--cases", "-2"], "--cases must be >= 1")
    bad(ck + out + ["--seed", "-1"], "--seed -1 must be >= 0")
    bad(ck + out + ["--cases", "2.5"], "invalid int value")
    bad(ck + out + ["--full-memory-gb", "0"], "must be > 0")
    assert not (tmp_path / "o").exists()


def test_evaluate_runs_a_lookalike_task_and_reports_recall_beside_accuracy(tmp_path):
    out = tmp_path / "o"
    argv = ["--config", "tiny", "--untrained", "--out", str(out), "--only", "passkey",
            "--task", "multikey_word", "--needles", "4", "--lengths", "512", "--cases", "2",
            "--methods", "megacontext_retrieval,sliding_window", "--no-progress"]
    assert evaluate.main(argv) == 0
    pk = json.loads((out / "results.json").read_text())["passkey"]
    assert pk["task"] == "multikey_word" and "4 needles" in pk["task_note"]
    row = pk["methods"]["megacontext_retrieval"]["512"]
    assert row["n"] == 2 and len(row["answer_raw"]) == 2
    report = (out / "report.md").read_text()
    assert "Task: multikey_word" in report and "Focus recall:" in report
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--task", "nosuch"])
    assert e.value.code == 2


def test_checkpoint_for_another_base_model_is_a_clear_error(capsys, tmp_path, frozen, cfg):
    other = override(cfg, {"base_config.num_layers": 2})
    _write_gist_workdir(tmp_path / "other", other, untrained_params(cfg, "gist",
                                                                    frozen.params))
    _fails(capsys, ["--checkpoint", str(tmp_path / "other"), "--out", str(tmp_path / "o"),
                    "--only", "nll"],
           "base_config.num_layers: checkpoint 2 vs session 3")


def test_checkpoint_kind_decides_which_nets_are_trained(tmp_path, frozen, cfg, gist_workdir):
    from mcjax.nets import resolve_networks

    lens = jax.tree.map(lambda x: x + 0.5, untrained_params(cfg, "lens"))
    gist = gist_workdir[1]
    joint = tmp_path / "joint"
    _write_workdir(joint, cfg, {"gist": gist, "lens": lens}, {"run": "train_joint"})
    nets = resolve_networks(cfg, frozen.params, checkpoint=joint)
    assert nets.untrained == ()
    assert nets.sources["gist"]["path"] == nets.sources["lens"]["path"] == str(joint)
    np.testing.assert_array_equal(jax.tree.leaves(nets.lens)[0], jax.tree.leaves(lens)[0])

    # a train_lens workdir: LensNet from it, GistNet the one it was trained with
    lens_run = tmp_path / "lens"
    _write_workdir(lens_run, cfg, {"lens": lens}, {"run": "train_lens", "gistnet": {
        "source": "checkpoint", "path": str(gist_workdir[0]), "step": 2}})
    nets = resolve_networks(cfg, frozen.params, checkpoint=lens_run)
    assert nets.untrained == ()
    assert nets.sources["gist"]["chosen_by"] == "the LensNet checkpoint's GistNet"
    np.testing.assert_array_equal(jax.tree.leaves(nets.gist)[0], jax.tree.leaves(gist)[0])

    # a train_gist workdir leaves LensNet untrained, and says so; --untrained: both
    nets = resolve_networks(cfg, frozen.params, checkpoint=gist_workdir[0])
    assert nets.untrained == ("lens",) and "train_gist" in nets.sources["lens"]["why"]
    nets = resolve_networks(cfg, frozen.params, untrained=True)
    assert nets.untrained == ("gist", "lens")
    np.testing.assert_array_equal(jax.tree.leaves(nets.gist)[0],
                                  jax.tree.leaves(nets.untrained_gist)[0])


def test_evaluation_and_session_find_the_same_gistnet_for_every_kind_of_lens_checkpoint(
        tmp_path, frozen, cfg, gist_workdir):
    """`resolve_networks` and `Session.from_checkpoints` share one rule
    (`nets.lens_gistnet`): given only a LensNet workdir, both pick the GistNet it was
    trained with — a train_joint run's own, a named checkpoint, a named params file, the
    untrained net of a named seed — and the untrained default when the named one is gone."""
    from mcjax.nets import resolve_networks

    lens = jax.tree.map(lambda x: x + 0.5, untrained_params(cfg, "lens"))
    ckpt_gist = gist_workdir[1]
    file_gist = jax.tree.map(lambda x: x * 0.5 - 0.02, ckpt_gist)
    gist_file, _ = assets.save_gist_params(file_gist, cfg, tmp_path / "g.safetensors", step=9)
    seeded = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=5))
    default = untrained_params(cfg, "gist", frozen.params)
    cases = {  # name: (run meta, GistNet expected, its source)
        "joint": ({"run": "train_joint"}, ckpt_gist, "checkpoint"),
        "checkpoint": ({"run": "train_lens", "gistnet": {
            "source": "checkpoint", "path": str(gist_workdir[0]), "step": 2}},
            ckpt_gist, "checkpoint"),
        "params_file": ({"run": "train_lens", "gistnet": {
            "source": "params_file", "path": str(gist_file), "step": 9}},
            file_gist, "params_file"),
        "untrained_seed": ({"run": "train_lens", "gistnet": {"source": "untrained",
                                                             "seed": 5}},
                           untrained_params(seeded, "gist", frozen.params), "untrained"),
        "gone": ({"run": "train_lens", "gistnet": {
            "source": "checkpoint", "path": str(tmp_path / "deleted"), "step": 2}},
            default, "untrained"),
    }
    for name, (meta, want, source) in cases.items():
        run = tmp_path / name
        nets = {"lens": lens, "gist": ckpt_gist} if name == "joint" else {"lens": lens}
        _write_workdir(run, cfg, nets, meta)
        got = resolve_networks(cfg, frozen.params, lens_checkpoint=run)
        session = Session.from_checkpoints((cfg.base_config, frozen.params), cfg,
                                           lens_checkpoint=run, batch_size=1)
        assert got.sources["gist"]["source"] == source, name
        assert session.provenance["gist"]["source"] == source, name
        if name != "gone":
            assert got.sources["gist"]["chosen_by"] == "the LensNet checkpoint's GistNet"
            assert session.provenance["gist"]["chosen_by"] == got.sources["gist"]["chosen_by"]
        for leaf_got, leaf_session, leaf_want in zip(
                jax.tree.leaves(got.gist), jax.tree.leaves(session.network_params["gist"]),
                jax.tree.leaves(want)):
            np.testing.assert_array_equal(leaf_got, leaf_want, err_msg=name)
            np.testing.assert_array_equal(leaf_session, leaf_want, err_msg=name)
    # the params file's card step and training seed travel with its provenance
    nets = resolve_networks(cfg, frozen.params, lens_checkpoint=tmp_path / "params_file")
    assert nets.sources["gist"]["step"] == 9
    assert nets.sources["gist"]["seed"] == cfg.train.seed


def test_paired_accuracy_counts_discordant_cases_and_gives_the_exact_sign_test():
    from mcjax.eval.metrics import paired_accuracy

    a = [True] * 6 + [False] * 2 + [True] * 2
    b = [True] * 6 + [True] * 2 + [False] * 2
    r = paired_accuracy(a, b)
    assert (r["both"], r["only_a"], r["only_b"], r["neither"]) == (6, 2, 2, 0)
    assert r["mean_diff"] == 0.0 and r["mcnemar_p"] == 1.0
    r = paired_accuracy([True] * 8 + [False] * 2, [False] * 8 + [False] * 2)
    assert r["only_a"] == 8 and r["mean_diff"] == pytest.approx(0.8)
    assert r["mcnemar_p"] == pytest.approx(2 / 2**8)  # all 8 discordant cases favour a
    d = np.array([1.0] * 8 + [0.0] * 2)
    assert r["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(10))
    with pytest.raises(ValueError):
        paired_accuracy([True], [True, False])


def test_focus_quality_scores_lensnet_v2_and_retrieval_on_the_same_candidates(frozen, cfg):
    from mcjax import retrieval
    from mcjax import counterfactuals
    from mcjax.counterfactuals import lens_task

    v2 = override(cfg, {"lens.query_tokens": 3, "lens.query_layer": 2,
                        "lens.retrieval_features": True})
    fz = dataclasses.replace(frozen, cfg=v2)
    task = lens_task(v2, 3)
    gist = untrained_params(v2, "gist", frozen.params)
    lens = untrained_params(v2, "lens")
    batch = np.random.default_rng(3).integers(3, 256, (2, task.window_len)).astype(np.int32)
    res = baselines.focus_quality(fz, gist, lens, [batch], task)
    assert set(res["scorers"]) == {"lens", "retrieval", "recency", "random"}
    n = {s: r["vs_value"]["n"] for s, r in res["scorers"].items()}
    assert len(set(n.values())) == 1 and res["candidates"] == n["lens"] > 2
    # the retrieval scorer reads the allocator's candidate scores of retrieval.slot_scores
    cf = baselines._counterfactuals(gist, frozen.params, jnp.asarray(batch),
                                    jax.random.fold_in(jax.random.key(0), 0),
                                    base_cfg=v2.base_config, gist_cfg=v2.gist, task=task)
    got = baselines._candidate_predictions(lens, cf, jax.random.key(1), lens_cfg=v2.lens,
                                           task=task, scorer="retrieval")
    want = [counterfactuals.candidate_scores(retrieval.slot_scores(
        jax.tree.map(lambda x: x[b], cf.wc), cf.retrieval_blocks[b], v2.mc),
        jax.tree.map(lambda x: x[b], cf.candidates), v2.mc.block_size) for b in range(2)]
    np.testing.assert_allclose(np.asarray(got), np.stack(want), atol=1e-6)
    # a task without the retrieval read has no retrieval scorer, and asking for it is clear
    v1_task = lens_task(cfg, 3)
    v1 = baselines.focus_quality(frozen, gist, untrained_params(cfg, "lens"), [batch], v1_task)
    assert "retrieval" not in v1["scorers"]
    with pytest.raises(ValueError, match="retrieval read"):
        baselines.focus_quality(frozen, gist, None, [batch], v1_task, scorers=["retrieval"])
    with pytest.raises(ValueError, match="unknown focus scorers"):
        baselines.focus_quality(frozen, gist, None, [batch], v1_task, scorers=["oracle"])


def test_session_variants_pair_each_option_with_the_reference_on_the_same_text(frozen, cfg):
    """`session_variants_nll` (experiments/kv_reuse.py): every variant scores the same
    windows and rounds; the paired rows are the per-window differences to the first
    variant; variants that differ only in kv_reuse took identical focus actions; the
    decode teacher's "on_collapse" variant re-prefills in fewer refocuses; bad settings and
    teachers are clear errors."""
    from mcjax.eval.kv_reuse import session_variants_nll

    K = cfg.mc.block_size
    history, rounds = 300, 4
    windows = np.random.default_rng(5).integers(3, 256, (3, history + rounds * K))
    variants = {"exact": {"kv_reuse": "exact"}, "approx": {"kv_reuse": "approx"},
                "exact/on_collapse": {"kv_reuse": "exact", "decode_focus": "on_collapse"}}
    base_model = (cfg.base_config, frozen.params)
    res = session_variants_nll(base_model, None, None, cfg, windows, history=history,
                               rounds=rounds, variants=variants, teacher="decode",
                               batch_size=CASES, focus_policy="random", max_tokens=MAX_TOKENS,
                               progress=False)
    assert res["reference"] == "exact" and set(res["paired_vs_reference"]) == {
        "approx", "exact/on_collapse"}
    nll = {k: np.asarray(v["per_window_nll"]) for k, v in res["variants"].items()}
    assert all(v.shape == (3,) and np.all(np.isfinite(v)) and np.all(v > 0)
               for v in nll.values())
    for name, row in res["paired_vs_reference"].items():
        d = nll[name] - nll["exact"]
        assert row["n"] == 3 and len(row["per_round"]) == rounds
        np.testing.assert_allclose(row["mean"], d.mean(), atol=2e-6)
        np.testing.assert_allclose(row["stderr"], d.std(ddof=1) / np.sqrt(3), atol=2e-6)
    share = {k: v["reprefilling_refocus_share"] for k, v in res["variants"].items()}
    assert share["exact/on_collapse"] < share["exact"]
    with pytest.raises(ValueError, match="unknown settings"):
        session_variants_nll(base_model, None, None, cfg, windows, history=history,
                             rounds=rounds, variants={"x": {"w_max": 3}}, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        session_variants_nll(base_model, None, None, cfg, windows, history=history,
                             rounds=rounds, variants=variants, teacher="oracle",
                             progress=False)


def test_needle_blocks_lod_at_and_relevance_ranks():
    from mcjax.working_context import lod_at

    assert tasks.needle_blocks((31, 33), 32) == [0, 1]
    assert tasks.needle_blocks((64, 96), 32) == [2] and tasks.needle_blocks((5, 5), 32) == []
    runs = [(0, 0, 64, 64), (1, 64, 128, 2), (2, 1024, 2048, 1)]
    assert [lod_at(runs, p) for p in (0, 63, 64, 127, 1500, 300)] == [0, 0, 1, 1, 2, None]
    rel = np.array([0.5, 2.0, -np.inf, 2.0, 1.0])
    assert metrics.relevance_ranks(rel, [1, 3, 4, 0, 2]) == [1, 1, 3, 4, 5]
