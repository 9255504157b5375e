"""The embedding-space ceiling (mcjax/eval/ceiling.py) on the tiny config: free vectors in
the gist slots, optimised per window against the full context's distributions, reduce the
KL over their steps and bring ΔNLL@H toward the full context; they start exactly at the
mean-pool baseline; one jitted step serves every batch of windows."""

import numpy as np
import pytest

from mcjax.config import get_config
from mcjax.eval import baselines, ceiling, tasks
from mcjax.scoring import load_frozen


@pytest.fixture(scope="module")
def frozen():
    return load_frozen(get_config("tiny"))


@pytest.fixture(scope="module")
def run(frozen):
    cfg = frozen.cfg
    spec = tasks.layouts_by_name(cfg.mc, cfg.train.seq_len - cfg.mc.horizon, ["lod1_keep1"])[0]
    windows = np.random.default_rng(0).integers(3, 256, (3, cfg.train.seq_len)).astype(np.int32)
    before = ceiling._step._cache_size()
    res = ceiling.optimize_ceiling(frozen.params, cfg.base_config, windows, spec,
                                   ceiling.CeilingConfig(steps=30, log_every=5), batch_size=2)
    return spec, windows, res, ceiling._step._cache_size() - before


def test_ceiling_reduces_kl_and_moves_dnll_toward_the_full_context(run):
    spec, _, r, _ = run
    assert r.nll_ceiling.shape == (3,) and r.kl_curve.shape == (len(r.curve_steps), 3)
    assert r.curve_steps[0] == 0 and r.curve_steps[-1] == 29
    np.testing.assert_allclose(r.kl_curve[0], r.kl_init, rtol=1e-6)
    assert (r.kl_ceiling < 0.5 * r.kl_init).all()  # every window's KL falls
    assert r.kl_curve.mean(1)[-1] < r.kl_curve.mean(1)[0]
    init = r.nll_init - r.nll_full
    ceil = r.nll_ceiling - r.nll_full
    # KL -> 0 pulls the compressed NLL to the full context's. On a random tiny base the
    # mean-pool start can sit *below* the full context (ΔNLL < 0), so the check is on |ΔNLL|;
    # on a real base (ΔNLL > 0 at the start) that is ΔNLL_ceiling <= ΔNLL_mean_pool.
    assert np.abs(ceil).mean() <= np.abs(init).mean()
    assert np.abs(ceil).mean() < np.abs(r.nll_truncation - r.nll_full).mean()


def test_ceiling_starts_at_the_mean_pool_baseline_and_compiles_one_step(frozen, run):
    spec, windows, r, compiles = run
    assert compiles == 1  # 2 batches of 2 windows (the last padded): one compiled step
    got = baselines.window_variant_nll(frozen, None, None, windows, spec.layout,
                                       ("full", "mean_pool", "truncation"))
    np.testing.assert_allclose(r.nll_init, got["mean_pool"].mean(1), atol=1e-5)
    np.testing.assert_allclose(r.nll_full, got["full"].mean(1), atol=1e-5)
    np.testing.assert_allclose(r.nll_truncation, got["truncation"].mean(1), atol=1e-5)

    sec = ceiling.ceiling_section([r])
    row = sec["layouts"][0]
    assert row["layout"] == "lod1_keep1" and row["n"] == 3 and row["steps"] == 30
    assert row["ceiling"]["n"] == 3 and row["ceiling"]["delta_nll"] == pytest.approx(
        float((r.nll_ceiling - r.nll_full).mean()), abs=1e-6)
    assert row["kl_truncation"]["mean"] > row["kl_ceiling"]["mean"]
    assert set(r.arrays()) >= {"lod1_keep1/nll_ceiling", "lod1_keep1/kl_curve"}


def test_ceiling_rejects_bad_settings(frozen):
    with pytest.raises(ValueError, match="steps"):
        ceiling.CeilingConfig(steps=0)
    with pytest.raises(ValueError, match="learning rate"):
        ceiling.CeilingConfig(learning_rate=0.0)
    cfg = frozen.cfg
    spec = tasks.nll_layouts(cfg.mc, 1088, (1,))[0]
    with pytest.raises(ValueError, match="windows must be"):
        ceiling.optimize_ceiling(frozen.params, cfg.base_config, np.zeros((2, 100), np.int32),
                                 spec)


def test_ceiling_started_from_a_gistnet_begins_at_that_nets_gists(frozen):
    """init="gistnet": the step-0 NLL is the GistNet variant's (an independent forward of
    the same net), and the optimised vectors never end worse in KL than that start."""
    from mcjax.nets import untrained_params

    cfg = frozen.cfg
    spec = tasks.layouts_by_name(cfg.mc, cfg.train.seq_len - cfg.mc.horizon, ["lod1_keep1"])[0]
    windows = np.random.default_rng(1).integers(3, 256, (2, cfg.train.seq_len)).astype(np.int32)
    gist = untrained_params(cfg, "gist", frozen.params)
    res = ceiling.optimize_ceiling(frozen.params, cfg.base_config, windows, spec,
                                   ceiling.CeilingConfig(steps=8, log_every=4, init="gistnet"),
                                   batch_size=2, gist_params=gist, gist_cfg=cfg.gist)
    got = baselines.window_variant_nll(frozen, gist, None, windows, spec.layout,
                                       ("gistnet", "mean_pool"))
    np.testing.assert_allclose(res.nll_init, got["gistnet"].mean(1), atol=1e-5)
    assert not np.allclose(res.nll_init, got["mean_pool"].mean(1), atol=1e-3)
    assert (res.kl_ceiling < res.kl_init).all()
    assert ceiling.ceiling_section([res])["layouts"][0]["init"] == "gistnet"
    with pytest.raises(ValueError, match="needs gist_params"):
        ceiling.optimize_ceiling(frozen.params, cfg.base_config, windows, spec,
                                 ceiling.CeilingConfig(steps=2, init="gistnet"))
    with pytest.raises(ValueError, match="init must be one of"):
        ceiling.CeilingConfig(init="zeros")


def test_ceiling_fitted_on_the_tail_never_sees_the_continuation_it_is_scored_on(frozen):
    """fit="tail": the vectors depend on the window's past only — windows that differ only
    in their continuation end with the same vectors (equal RMS) but score differently —
    while fit="continuation" fits the scored targets themselves (its vectors differ)."""
    cfg = frozen.cfg
    P = cfg.train.seq_len - cfg.mc.horizon
    spec = tasks.layouts_by_name(cfg.mc, P, ["lod1_keep1"])[0]
    rng = np.random.default_rng(2)
    a = rng.integers(3, 256, (1, cfg.train.seq_len)).astype(np.int32)
    b = a.copy()
    b[:, P:] = rng.integers(3, 256, (1, cfg.train.seq_len - P))
    windows = np.concatenate([a, b])
    out = {}
    for fit in ceiling.FITS:
        out[fit] = ceiling.optimize_ceiling(
            frozen.params, cfg.base_config, windows, spec,
            ceiling.CeilingConfig(steps=6, log_every=3, fit=fit), batch_size=2)
    tail, cont = out["tail"], out["continuation"]
    np.testing.assert_allclose(tail.vector_rms[0], tail.vector_rms[1], rtol=1e-6)
    assert not np.isclose(cont.vector_rms[0], cont.vector_rms[1], rtol=1e-6)
    assert abs(tail.nll_ceiling[0] - tail.nll_ceiling[1]) > 1e-3  # scored on each's own
    # the start and the references are the same whatever the fit
    np.testing.assert_allclose(tail.nll_init, cont.nll_init, atol=1e-5)
    np.testing.assert_allclose(tail.kl_truncation, cont.kl_truncation, atol=1e-5)
    assert ceiling.ceiling_section([tail])["layouts"][0]["fit"] == "tail"
    with pytest.raises(ValueError, match="fit must be one of"):
        ceiling.CeilingConfig(fit="everything")
