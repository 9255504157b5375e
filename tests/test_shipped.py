"""The nets shipped in mcjax/assets/: they load, match their cards, are what sessions and
evaluations use by default; on fixed held-out windows the GistNet beats dropping the span
and LensNet v2 reproduces retrieval focus."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import assets, nets
from mcjax.config import get_config
from mcjax.eval.metrics import paired_vs_truncation
from mcjax import data, scoring
from mcjax.train import loop

pytestmark = pytest.mark.slow

if not assets.SHIPPED_GIST.is_file():  # a checkout without the shipped file is broken
    raise FileNotFoundError(f"the shipped GistNet {assets.SHIPPED_GIST} is missing")


@pytest.fixture(scope="module")
def shipped(smollm2):
    cfg = dataclasses.replace(get_config("smollm2_135m_cpu"), base_config=smollm2.config)
    return cfg, smollm2


def test_shipped_gistnet_loads_and_matches_its_card(shipped):
    cfg, _ = shipped
    card = assets.read_card(assets.SHIPPED_GIST)
    assert card["part"] == "gist" and card["format"] == assets.FORMAT
    assert assets.gist_config_from_card(card) == cfg.gist  # the config it is the default for
    for k in ("position_scheme", "sink_blocks", "block_size", "num_levels"):
        assert card["config"]["mc"][k] == getattr(cfg.mc, k)
    for k in ("command", "data", "step", "figures"):
        assert card.get(k), f"card lacks {k!r}"
    got = nets.shipped_gist(cfg)
    assert got is not None and got[1]["source"] == "shipped"
    # another GistNet architecture does not silently get these params
    other = dataclasses.replace(cfg, gist=dataclasses.replace(cfg.gist, input_layer=3))
    assert nets.shipped_gist(other) is None


def test_sessions_use_the_shipped_gistnet_unless_told_untrained(shipped):
    from mcjax.runtime import Session

    cfg, model = shipped
    s = Session(model, None, None, cfg, max_tokens=1024)
    assert s.provenance["gist"]["source"] == "shipped" and "gist" not in s.untrained
    u = Session(model, None, None, cfg, max_tokens=1024, untrained=True)
    assert u.provenance["gist"]["source"] == "untrained" and "gist" in u.untrained


def test_shipped_gistnet_beats_truncation_at_32_to_1_on_fixed_held_out_windows(shipped):
    cfg, model = shipped
    frozen = scoring.Frozen(cfg, model.params, model.encode, cfg.base,
                            cfg.base_config.eos_token_id)
    params, _ = nets.shipped_gist(cfg)
    layout = loop.gist_layout(cfg, use_lod2=False, keep_raw_blocks=1)  # 32 LOD1 gists
    assert layout.compression_ratio == 32.0 and layout.num_gists == 32
    (batch,) = data.held_out_batches(frozen, 1, 8, cfg.train.seq_len, seed=4321)
    nll = {v: np.asarray(scoring.variant_nll(
        model.params, params, jnp.asarray(batch), base_cfg=cfg.base_config, gist_cfg=cfg.gist,
        layout=layout, variant=v)).mean(axis=1) for v in ("full", "gistnet", "truncation")}
    row = paired_vs_truncation(nll["gistnet"], nll["truncation"], nll["full"])
    # the gists must carry information: lower NLL than dropping the span, window-paired
    assert row["mean_diff_vs_truncation"] < -0.02, row  # 64 windows: -0.045 ± 0.007
    assert row["gap_recovered"] > 0.05, row  # 64 windows: 14 % (results/eval_gist_v2)


def test_shipped_lensnet_loads_matches_its_card_and_is_the_sessions_default(shipped):
    from mcjax.runtime import Session

    cfg, model = shipped
    card = assets.read_card(assets.SHIPPED_LENS)
    assert card["part"] == "lens" and assets.lens_config_from_card(card) == cfg.lens
    assert cfg.lens.query_tokens > 0 and cfg.lens.retrieval_features  # v2
    for k in ("command", "data", "step", "training"):
        assert card.get(k), f"card lacks {k!r}"
    got = nets.shipped_lens(cfg)
    assert got is not None and got[1]["source"] == "shipped"
    other = dataclasses.replace(cfg, lens=dataclasses.replace(cfg.lens, query_tokens=4))
    assert nets.shipped_lens(other) is None  # another architecture: not these params
    s = Session(model, None, None, cfg, max_tokens=1024, focus_policy="lens")
    assert s.provenance["lens"]["source"] == "shipped" and "lens" not in s.untrained
    r = Session(model, None, None, cfg, max_tokens=1024, focus_policy="retrieval")
    assert r.provenance["lens"]["source"] == "untrained"  # not loaded where not used


def test_shipped_lensnet_reproduces_retrieval_focus_and_beats_recency_on_passkey_cases(shipped):
    """On held-out real text it was not trained on: LensNet v2's best slot is the
    teacher's (retrieval + needle label) wherever the teacher expands something, the
    needle's gist clears tau_expand, and it expands nothing the teacher would not; recency
    focus on the same states (needles at 15-75 % depth) finds the needle's gist less often."""
    from mcjax.retrieval import BlockKeys
    from mcjax.runtime import recency_scores
    from mcjax import data
    from mcjax.train import distill
    from mcjax.tree import BlockGister, MegaContextTree

    cfg, model = shipped
    gist, _ = nets.shipped_gist(cfg)
    lens_params, _ = nets.shipped_lens(cfg)
    K = cfg.mc.block_size
    gister = BlockGister.from_base(cfg.gist, gist, model.params, cfg.base_config, block_size=K,
                                   retrieval=cfg.retrieval)
    block_keys = BlockKeys(cfg.retrieval, cfg.base_config, K)
    hay = data.tokenized_corpus(model.encode, cfg.base, "held_out",
                                separator=cfg.base_config.eos_token_id,
                                progress=False).tokens
    rows, recency_rows = [], []
    for seed in range(3):
        rng = np.random.default_rng([77, seed])
        ex = data.make_retrieval_example(model.encode, 2560, rng, haystack=hay,
                                         depth=0.15 + 0.3 * seed)
        tree = MegaContextTree.in_memory(cfg.mc, gister, view_capacity_tokens=2560,
                                         block_keys=block_keys)
        tree.append(ex.tokens)
        a, b = ex.needle_span
        states = distill.distill_states(model.params, tree.view(), cfg,
                                        list(range(a // K, (b - 1) // K + 1)), rounds=2,
                                        rng=rng, explore=0.0)
        batch = distill.batch_from_states(distill.stack_states(states))
        scores = distill.distill_scores(lens_params, batch, cfg.lens, cfg.mc)
        rows.append(jax.device_get(distill.distill_metrics(scores, batch, cfg.mc)))
        recency_rows.append(jax.device_get(distill.distill_metrics(
            recency_scores(batch.wc, cfg.mc), batch, cfg.mc)))
    m, r = distill.mean_metrics(rows), distill.mean_metrics(recency_rows)
    assert m["n_want"] >= 3 and m["best_agree"] == 1.0, m
    assert m["n_needle"] >= 3 and m["needle_expand"] == 1.0, m
    assert m["false_expand"] == 0.0, m
    # the baseline on the very same states: its best slot is the newest gist, not the needle's
    assert r["best_agree"] < m["best_agree"] and r["needle_expand"] < m["needle_expand"], r


def test_make_run_demo_expands_a_raw_span_inside_the_older_history(smollm2, capsys):
    """`make run`'s demo at a reduced size (a 2,048-token document, still 4x w_max): the
    focus map after the answer shows raw tokens between gists, away from the sink and the
    recent tail — the planted fact brought back by focus (the shipped LensNet v2)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--demo", "--demo-tokens", "2048", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if "LOD" in line and " x " in line]
    levels = [int(line.split("LOD")[1].split()[0]) for line in runs]
    assert len(levels) >= 3 and levels[-1] == 0
    inner = levels[1:-1]
    assert 0 in inner and any(l >= 1 for l in levels[:levels.index(0, 1)]), out
    assert "sliding window" in out and "expected " in out


def test_harness_adapter_uses_the_shipped_nets_by_default(smollm2):
    pytest.importorskip("lm_eval")
    from mcjax.eval.harness import MegaContextLM

    lm = MegaContextLM(smollm2, "smollm2_135m_cpu", batch_size=1, max_tokens=1024)
    assert lm.focus_policy == "lens"
    assert lm.provenance["gist"]["source"] == "shipped"
    assert lm.provenance["lens"]["source"] == "shipped"
