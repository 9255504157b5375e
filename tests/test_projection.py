"""AOT cost projection (mcjax.projection, mcjax.hlo_cost): the loop-aware HLO count agrees
with XLA's own cost analysis where both count the same things, expands loops and bf16
upcasts as documented, and every projected program of the tiny config compiles from
abstract inputs with positive costs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax import hlo_cost, projection
from mcjax.base import model as base
from mcjax.config import TINY_LLAMA, get_config

SLOTS = 256


def _decode_step(llama):
    params = jax.eval_shape(lambda k: base.init_params(llama, k), jax.random.key(0))
    cache = jax.eval_shape(lambda: base.init_cache(llama, 1, SLOTS))
    ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    jitted = jax.jit(base.decode_step_unchecked, static_argnames=("config",))
    return jitted.lower(params, llama, cache, ids, ids,
                        jax.ShapeDtypeStruct((), jnp.int32)).compile()


def test_walk_matches_xla_when_counting_alike_and_expands_the_layer_scan():
    """float32 (no upcasts), every loop body once: XLA's HloCostAnalysis convention, so
    the two counts of the same compiled decode step agree; expanded, the layer scan counts
    num_layers times (the per-layer part grows, the rest does not)."""
    llama = dataclasses.replace(TINY_LLAMA, dtype="float32")
    compiled = _decode_step(llama)
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    once = hlo_cost.program_cost(compiled.as_text(), expand_loops=False).total()
    assert once.bytes == pytest.approx(xla["bytes accessed"], rel=0.02)
    assert once.flops == pytest.approx(xla["flops"], rel=0.05)
    expanded = hlo_cost.program_cost(compiled.as_text()).total()
    assert once.bytes < expanded.bytes < llama.num_layers * once.bytes
    assert expanded.flops > 2 * once.flops  # 3 layers, the head counted once


def test_bf16_upcasts_are_free_and_reads_keep_the_stored_width():
    """XLA:CPU upcasts bf16 weights to f32 for its dots; the walk counts them at 2 bytes:
    the bf16 step moves about half the f32 step's bytes (what a bf16 accelerator reads),
    while XLA's own count of the bf16 step exceeds the walk's (it pays the upcasts)."""
    f32 = hlo_cost.program_cost(_decode_step(
        dataclasses.replace(TINY_LLAMA, dtype="float32")).as_text()).total()
    compiled = _decode_step(dataclasses.replace(TINY_LLAMA, dtype="bfloat16"))
    bf16 = hlo_cost.program_cost(compiled.as_text()).total()
    assert 0.35 * f32.bytes < bf16.bytes < 0.65 * f32.bytes
    assert bf16.flops == pytest.approx(f32.flops, rel=0.05)
    once = hlo_cost.program_cost(compiled.as_text(), expand_loops=False).total()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert xla["bytes accessed"] > 1.5 * once.bytes


def test_a_data_dependent_loop_is_reported_per_iteration():
    def f(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, x: x @ w, x)

    s = jax.ShapeDtypeStruct
    compiled = jax.jit(f).lower(s((8, 64), jnp.float32), s((64, 64), jnp.float32),
                                s((), jnp.int32)).compile()
    pc = hlo_cost.program_cost(compiled.as_text())
    (loop,) = pc.loops
    assert loop.body.flops == pytest.approx(2 * 8 * 64 * 64, rel=0.05)
    assert pc.total({loop.name: 3}).flops == pytest.approx(
        pc.fixed.flops + 3 * loop.body.flops)


def test_scale_layers_keeps_fractions_of_depth():
    assert projection.scale_layers((17, 24), 30, 32) == (18, 26)
    assert projection.scale_layers((17, 24), 30, 28) == (16, 22)
    assert projection.scale_layers((1, 2), 3, 3) == (1, 2)


def test_projection_experiment_swaps_the_base_and_moves_retrieval_layers():
    llama = projection.MODELS["llama-3.1-8b"]
    cfg, notes = projection.projection_experiment(llama)
    registered = get_config("smollm2_135m_cpu")
    assert cfg.base_config == llama and cfg.mc.w_max == 8192
    assert cfg.retrieval.layers == (18, 26) and notes["retrieval_layers"]["tuned_depth"] == 30
    assert cfg.gist == registered.gist and cfg.lens == registered.lens
    assert dataclasses.replace(cfg.mc, w_max=registered.mc.w_max) == registered.mc


@pytest.fixture(scope="module")
def tiny_projection():
    """Every program of PROGRAMS for the tiny config in bf16 (a short train window with
    one layout keeps the compiles small)."""
    llama = dataclasses.replace(TINY_LLAMA, dtype="bfloat16")
    cfg = get_config("tiny", {"mc.w_max": 128, "mc.recent_protect": 32,
                              "train.seq_len": 320 + 16, "train.gist_keep_raw": (1,),
                              "train.gist_lod2": False})
    cfg = dataclasses.replace(cfg, base_config=llama)
    return projection.project_model(llama, cfg), llama


def test_every_program_compiles_abstractly_with_positive_costs(tiny_projection):
    out, _ = tiny_projection
    assert set(out["programs"]) == set(projection.PROGRAMS)
    for name, rec in out["programs"].items():
        assert rec["xla_cost_analysis"]["flops"] > 0, name
        assert rec["xla_cost_analysis"]["bytes_accessed"] > 0, name
        assert rec["memory_analysis"]["argument_bytes"] > 0, name
        assert rec["per_unit"], name
        for scenario, cost in rec["per_unit"].items():
            assert cost["flops"] > 0 and cost["bytes"] > 0, (name, scenario)
            assert cost["bound_s"] == max(cost["hbm_s"], cost["flop_s"])
    refocus = out["programs"]["refocus:lens"]["per_unit"]
    assert refocus["full_reprefill"]["bytes"] > refocus["append"]["bytes"]
    assert "input_settle" in out["programs"]["refocus:retrieval"]["per_unit"]


def test_plain_decode_reads_at_least_its_weights_and_cache(tiny_projection):
    """A decode step must read every parameter the step uses and its cache: the projected
    bytes are at least the params' bytes and the analytic minimum (weights less the
    embedding table, plus K and V of every slot)."""
    out, llama = tiny_projection
    rec = out["programs"]["plain_decode"]
    step = rec["per_unit"]["token"]
    assert step["bytes"] >= out["params_bytes"]
    assert step["bytes"] >= rec["analytic"]["bytes"]
    assert rec["analytic"]["kv_bytes"] == 2 * llama.num_layers * 128 * llama.num_kv_heads \
        * llama.head_dim * 2
    session = out["programs"]["session_decode"]["per_unit"]["token"]
    assert session["bytes"] >= step["bytes"]  # K more cache slots, the same step
    dec = out["decode"]
    assert 0 < dec["ratio_step"]["walk"] <= 1.0 + 1e-9
    am = dec["amortized"]
    assert am["reprefill_every_K"]["walk"]["tok_s"] < am["append_every_K"]["walk"]["tok_s"]
    refocus = out["programs"]["refocus:retrieval"]
    for scenario in ("append", "full_reprefill"):  # the compiled program does at least that
        assert refocus["per_unit"][scenario]["bytes"] >= refocus["analytic"][scenario]["bytes"]
        assert refocus["analytic"][scenario]["bytes"] > 0


def test_markdown_names_every_program(tiny_projection):
    out, _ = tiny_projection
    text = projection.markdown({"meta": {"device": dataclasses.asdict(projection.H100_SXM)},
                                "models": {"tiny": out}})
    for name in projection.PROGRAMS:
        assert f"| {name} |" in text
    assert np.isfinite(out["decode"]["plain"]["walk"]["tok_s"])
