"""Project the programs' cost at real sizes by AOT compilation, with no accelerator and no
weights (SPEC §2.1 "Accelerators", §2.7 "Cost").

For a base model (e.g. Llama-3.1-8B in bf16) and a MegaContext experiment config at
W_max 8,192, every program is lowered and compiled from abstract inputs only
(`jax.ShapeDtypeStruct`s; parameter shapes from `jax.eval_shape`), through the functions
the runtime and the trainers use:

- the session's `refocus` and `decode` programs (`runtime.make_plan`, `runtime.programs`,
  inputs shaped by `initial_state` / `empty_view` / `initial_layouts`, one stream),
- one GistNet training step (`train.steps.GistStep` jitted by `jit_step`, as
  `experiments/train_gist.py` builds it),
- the plain base model's decode step over a W_max-slot KV cache (the reference).

Each compiled program reports XLA's own `memory_analysis()` and `cost_analysis()` — as
XLA:CPU sees them — and the loop-aware, bf16-faithful count of `mcjax.hlo_cost` (why both:
that module's docstring). Costs become H100 time bounds: bytes / HBM bandwidth and FLOPs /
dense bf16 peak, the larger of the two (a per-program roofline). An analytic count of a
decode step (weights read once + the KV cache read once) cross-checks the bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import hlo_cost
from mcjax.config import (ConfigError, ExperimentConfig, LlamaConfig, RopeScaling, get_config)

__all__ = ["Device", "H100_SXM", "MODELS", "PROGRAMS", "projection_experiment",
           "scale_layers", "analytic_decode", "project_model", "project", "markdown",
           "abstract"]


@dataclasses.dataclass(frozen=True)
class Device:
    """What a projection divides by: sustained-peak HBM bandwidth and dense bf16 FLOP/s."""

    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    hbm_bytes: float

    def seconds(self, cost: hlo_cost.HloCost) -> dict[str, float]:
        """Lower bounds on the time of `cost`: memory, compute, and the larger (roofline)."""
        mem = cost.bytes / self.hbm_bytes_per_s
        flop = cost.flops / self.bf16_flops_per_s
        return {"hbm_s": mem, "flop_s": flop, "bound_s": max(mem, flop)}


# H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 (1,979 with sparsity), 80 GB
H100_SXM = Device("NVIDIA H100 SXM (80 GB HBM3)", 3.35e12, 989e12, 80e9)

MODELS: dict[str, LlamaConfig] = {
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, dtype="bfloat16", architecture="llama",
        rope_scaling=RopeScaling(kind="llama3", factor=8.0,
                                 original_max_position_embeddings=8192,
                                 low_freq_factor=1.0, high_freq_factor=4.0)),
    "qwen2.5-7b": LlamaConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151643, dtype="bfloat16", architecture="qwen2", qkv_bias=True),
}

# What `project_model` can compile, in the order it does. "refocus:<policy>" is the refocus
# program under that focus policy ("lens", the default, is LensNet v2 with retrieval
# features in the CPU config; "retrieval" drops LensNet); the decode program does not
# depend on the policy.
PROGRAMS = ("plain_decode", "session_decode", "refocus:lens", "refocus:retrieval",
            "gist_train_step")

# Depth of the base model each registered experiment config was tuned on (its layer
# choices are fractions of it), for `scale_layers`.
_TUNED_DEPTH = {"smollm2-135m": 30}


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs of a pytree of arrays (host or device)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _abstract_params(llama: LlamaConfig) -> Any:
    from mcjax.base.model import init_params

    return jax.eval_shape(lambda k: init_params(llama, k), jax.random.key(0))


def _tree_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def scale_layers(layers: Sequence[int], tuned_depth: int, depth: int) -> tuple[int, ...]:
    """0-based layer indices chosen for a `tuned_depth`-layer model, moved to the same
    fractions of a `depth`-layer one (rounded; distinct and increasing)."""
    out = sorted({min(depth - 1, max(0, round(l * depth / tuned_depth))) for l in layers})
    return tuple(out)


def projection_experiment(llama: LlamaConfig, *, experiment: str = "smollm2_135m_cpu",
                          w_max: int = 8192) -> tuple[ExperimentConfig, dict]:
    """The registered `experiment` with its base model replaced by `llama` and W_max set
    (everything else as registered), and notes on what changed. Retrieval layers were
    chosen for the registered base model's depth: they move to the same fractions of
    `llama`'s depth. GistNet's output width follows `llama.hidden_size` by construction
    (`init_gist_params(cfg.gist, hidden_size, ...)`: `gist.width` is its internal width),
    as LensNet's input width does."""
    cfg = get_config(experiment)
    tuned = (cfg.base_config.num_layers if cfg.base_config is not None
             else _TUNED_DEPTH.get(cfg.base))
    if tuned is None:
        raise ConfigError(f"experiment {experiment!r}: unknown depth of its base model "
                          f"{cfg.base!r}; add it to projection._TUNED_DEPTH")
    layers = scale_layers(cfg.retrieval.layers, tuned, llama.num_layers)
    for name, layer, used in (("gist.input_layer", cfg.gist.input_layer,
                               cfg.gist.input == "hidden"),
                              ("lens.query_layer", cfg.lens.query_layer,
                               cfg.lens.query_tokens > 0)):
        if used and layer > llama.num_layers:
            raise ConfigError(f"{name}={layer} exceeds the base model's {llama.num_layers} "
                              f"layers")
    out = dataclasses.replace(
        cfg, name=f"{cfg.name}@{llama.num_layers}L_w{w_max}", base="random",
        base_config=llama, mc=dataclasses.replace(cfg.mc, w_max=int(w_max)),
        retrieval=dataclasses.replace(cfg.retrieval, layers=layers))
    notes = {
        "experiment": experiment, "w_max": int(w_max),
        "retrieval_layers": {"registered": list(cfg.retrieval.layers),
                             "tuned_depth": tuned, "projected": list(layers),
                             "depth": llama.num_layers},
        "gist_input_layer": cfg.gist.input_layer, "lens_query_layer": cfg.lens.query_layer,
        "gist_width": cfg.gist.width, "gist_output_width": llama.hidden_size,
        "gist_dtype": cfg.mc.gist_dtype, "nets_dtype": {"gist": cfg.gist.dtype,
                                                       "lens": cfg.lens.dtype},
    }
    return out, notes


# --------------------------------------------------------------------------- analytic


def analytic_decode(llama: LlamaConfig, slots: int) -> dict[str, float]:
    """The least a batch-1 decode step over a `slots`-slot KV cache must move and compute:
    every weight read once (not the embedding table, of which one row is gathered, unless
    it is tied to the head), every cache slot's K and V read once (attention masks
    invalid slots, it does not skip them); 2 FLOPs per weight of the projections and the
    head, 4·heads·head_dim per layer and slot of attention."""
    params = _abstract_params(llama)
    itemsize = jnp.dtype(llama.dtype).itemsize
    embed = llama.vocab_size * llama.hidden_size * itemsize
    weights = _tree_bytes(params) - (0 if llama.tie_word_embeddings else embed)
    kv = 2 * llama.num_layers * slots * llama.num_kv_heads * llama.head_dim * itemsize
    kernels = sum(math.prod(x.shape) for path, x in
                  jax.tree_util.tree_leaves_with_path(params)
                  if "kernel" in jax.tree_util.keystr(path))
    if llama.tie_word_embeddings:
        kernels += llama.vocab_size * llama.hidden_size
    attn = 4 * llama.num_layers * llama.num_heads * llama.head_dim * slots
    return {"weights_bytes": float(weights), "kv_bytes": float(kv),
            "bytes": float(weights + kv), "flops": float(2 * kernels + attn)}


def _layer_split(llama: LlamaConfig) -> tuple[float, float, float]:
    """(bytes of one decoder layer's params, its matmul weights (count), the head's
    bytes): the stacked layer params divided by depth."""
    params = _abstract_params(llama)
    layers = params["layers"]
    per_layer = _tree_bytes(layers) / llama.num_layers
    kernels = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(layers)
                  if "kernel" in jax.tree_util.keystr(path)) / llama.num_layers
    head = (0 if llama.tie_word_embeddings else
            llama.vocab_size * llama.hidden_size * jnp.dtype(llama.dtype).itemsize)
    return per_layer, kernels, head


def analytic_refocus(llama: LlamaConfig, plan) -> dict[str, dict[str, float]]:
    """The least the two refocus scenarios of `_refocus_scenarios` must move and compute,
    at batch 1 (weights re-read per chunk: a 256-slot chunk cannot keep 16 GB on chip):

    - "append": the question read (`query_window` tokens through the deepest layer the
      policy reads) and, when the trees keep keys, one read of every key row of the view
      (`max_tokens / K` blocks: the relevance scores the whole fixed-capacity view);
    - "full_reprefill": that plus W_max slots re-prefilled in C-slot chunks — every layer's
      weights once per chunk, chunk j's attention reading the K/V of its (j + 1)·C slots,
      every slot's K/V written once.
    LensNet, the allocator and materialize are left out (MBs)."""
    from mcjax import retrieval
    from mcjax.base.model import read_depth

    itemsize = jnp.dtype(llama.dtype).itemsize
    layer_bytes, layer_kernels, _ = _layer_split(llama)
    L, H, kvh, hd = llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim
    mc, rc, lens = plan.mc, plan.retrieval, plan.lens
    K, W, C = mc.block_size, mc.w_max, plan.prefill_chunk
    append_b = append_f = 0.0
    if plan.query_aware and rc is not None:
        hidden = lens.query_layer if (plan.focus_policy == "lens" and lens.query_tokens) \
            else None
        depth = read_depth(hidden, rc.layers)
        append_b += depth * layer_bytes
        append_f += 2 * depth * layer_kernels * rc.query_window
    if plan.keeps_keys and rc is not None:
        blocks = plan.view_rows(1)
        width = retrieval.key_width(rc, llama, K)
        append_b += blocks * width * retrieval.key_dtype(rc).itemsize
        append_f += 2 * blocks * K * len(rc.layers) * rc.queries * H * hd
    n = W // C
    kv_slot = 2 * L * kvh * hd * itemsize  # K and V of one slot, every layer
    re_b = n * L * layer_bytes + sum((j + 1) * C for j in range(n)) * kv_slot + W * kv_slot
    re_f = 2 * L * layer_kernels * W + sum(4 * L * H * hd * C * (j + 1) * C
                                           for j in range(n))
    return {"append": {"bytes": float(append_b), "flops": float(append_f)},
            "full_reprefill": {"bytes": float(append_b + re_b),
                               "flops": float(append_f + re_f)}}


# --------------------------------------------------------------------------- compiling


def _compile(jitted: Callable, *args, log: Callable[[str], None] | None = None,
             name: str = "") -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    if log:
        log(f"  compiled {name} in {seconds:.1f} s")
    return compiled, seconds


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0) or 0) for k in keys}


def _xla_cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX: one dict per device program
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {"flops": float(ca.get("flops", 0.0)),
            "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0))}


def _cost_dict(c: hlo_cost.HloCost) -> dict[str, float]:
    return {"flops": float(c.flops), "bytes": float(c.bytes)}


def _loop_dict(loop: hlo_cost.Loop) -> dict:
    return {"source": loop.source, "op_name": loop.op_name, "repeats": loop.repeats,
            "per_iteration": _cost_dict(loop.body),
            "top_items": [{"label": k, **_cost_dict(v)} for k, v in loop.items[:8]],
            "nested": [_loop_dict(x) for x in loop.nested]}


def _program(name: str, compiled, seconds: float, pc: hlo_cost.ProgramCost, unit: str,
             units: dict, device: Device, extra: dict | None = None) -> dict:
    """The JSON record of one compiled program (`pc`: its `hlo_cost.program_cost`).
    `units`: {scenario: HloCost per unit}."""
    return {
        "program": name, "compile_s": round(seconds, 2), "unit": unit,
        "memory_analysis": _memory(compiled),
        "xla_cost_analysis": _xla_cost(compiled),
        "hlo_walk": {"fixed": _cost_dict(pc.fixed),
                     "loops": [_loop_dict(x) for x in pc.loops],
                     "top_items_fixed": [{"label": k, **_cost_dict(v)}
                                         for k, v in pc.items[:8]]},
        "per_unit": {k: {**_cost_dict(c), **device.seconds(c)} for k, c in units.items()},
        **(extra or {}),
    }


def _one(pc: hlo_cost.ProgramCost, fragment: str, what: str) -> hlo_cost.Loop:
    found = [l for l in pc.loops if fragment in l.source]
    if len(found) != 1:
        raise RuntimeError(f"{what}: expected one top-level loop from {fragment!r}, found "
                           f"{[l.source for l in pc.loops]}")
    return found[0]


def _decode_step_cost(pc: hlo_cost.ProgramCost, block: int) -> hlo_cost.HloCost:
    """Per token of the session's decode program: one iteration of its step loop, plus the
    program's fixed part spread over a full block of K steps."""
    step = _one(pc, "decode_block", "session decode")
    return step.cost(1) + pc.fixed * (1.0 / block)


def _refocus_scenarios(pc: hlo_cost.ProgramCost, plan) -> dict[str, hlo_cost.HloCost]:
    """A refocus's cost in three situations, from its data-dependent loops (named by the
    Python functions that made them):

    - "append": after K decoded tokens when focus moves nothing (the common case): the
      append loop once, no collapse ahead, no settle round, no re-prefill (the pending
      tokens' KV entries are copied) — scoring and the question read still run;
    - "full_reprefill": the same plus a collapse ahead of `headroom` slots and a re-prefill
      of all W_max slots in C-slot chunks (chunk j's attention reads j + 1 key blocks):
      the most a refocus re-prefills (an edit right after the sink comes close);
    - "input_settle": a refocus after new input of K tokens with every settle round used
      and a full re-prefill (the most a refocus costs).
    Loops not named here run once."""
    mc = plan.mc
    K, W, C = mc.block_size, mc.w_max, plan.prefill_chunk
    names = {l.name: l for l in _walk(pc.loops)}
    base_iters = {n: 1 for n in names}
    for l in names.values():
        if any(s in l.source for s in ("collapse_ahead", "_settle", "prefill_chunks",
                                       "attention_prefix")):
            base_iters[l.name] = 0
    append = pc.total(base_iters)
    prefill = [l for l in pc.loops if "prefill_chunks" in l.source]
    if not prefill:
        raise RuntimeError(f"refocus: no re-prefill loops found among "
                           f"{[l.source for l in pc.loops]}")
    bulk = max(prefill, key=lambda l: l.body.flops)  # the C-slot chunk loop
    block = _attention_block()
    reprefill = hlo_cost.HloCost()
    for j in range(W // C):
        stop = (j + 1) * C
        reprefill = reprefill + bulk.body
        for inner in bulk.nested:
            reprefill = reprefill + inner.cost(-(-stop // block))
    ahead = [l for l in pc.loops if "collapse_ahead" in l.source]
    collapses = -(-plan.headroom // (K - 1)) if plan.headroom else 0
    ahead_cost = sum((l.cost(collapses) for l in ahead), hlo_cost.HloCost())
    out = {"append": append, "full_reprefill": append + ahead_cost + reprefill}
    settle = [l for l in pc.loops if "_settle" in l.source]
    if settle and plan.settle_rounds:
        rounds = plan.settle_rounds
        out["input_settle"] = out["full_reprefill"] + sum(
            (dataclasses.replace(l, nested=()).cost(rounds) for l in settle),
            hlo_cost.HloCost())
    return out


def _walk(loops) -> list[hlo_cost.Loop]:
    out = []
    for l in loops:
        out.append(l)
        out.extend(_walk(l.nested))
    return out


def _attention_block() -> int:
    from mcjax.base import model as base

    return base.ATTENTION_CHUNK


def _session_inputs(plan, cfg: ExperimentConfig, llama: LlamaConfig):
    """Abstract inputs of the refocus and decode programs, shaped by the same builders a
    `Session` uses (`initial_state`, `empty_view`, `initial_layouts`; their host arrays
    are zero-filled by `np.zeros`, i.e. untouched pages, and dropped at once)."""
    from mcjax import retrieval
    from mcjax.nets import expected_params
    from mcjax.runtime.state import empty_view, initial_layouts, initial_state

    B = plan.batch_size
    state = abstract(initial_state(plan))
    keys = ((retrieval.key_width(cfg.retrieval, llama, plan.mc.block_size),
             retrieval.key_dtype(cfg.retrieval)) if plan.keeps_keys else ())
    view = abstract(empty_view(plan, *keys))
    layout = abstract(initial_layouts(plan, [0] * B, np.zeros(B, bool)))
    # Session passes LensNet's params as focus_params for "lens" and "retrieval" (unused)
    focus = expected_params(cfg, "lens")
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    pred = lambda *s: jax.ShapeDtypeStruct(s, jnp.bool_)  # noqa: E731
    return dict(state=state, view=view, layout=layout, focus=focus, i32=i32, pred=pred)


def _gist_train_step(cfg: ExperimentConfig, base_params, log) -> tuple[Any, float, dict]:
    """One GistNet step as `train.loop.train_gist` builds it (layouts, weights, optimizer,
    EMA), jitted by `steps.jit_step` over a one-device mesh, compiled from abstract
    inputs."""
    from mcjax.nets import expected_params
    from mcjax.sharding import make_mesh
    from mcjax.train import loop, steps

    tc = cfg.train
    layouts = loop.gist_train_layouts(cfg)
    step = steps.GistStep(cfg, tuple(layouts.values()), nll_weight=tc.gist_nll_weight,
                          kl_weight=tc.gist_kl_weight, dense=tc.gist_dense)
    optimizer = steps.make_optimizer(tc)
    gist = expected_params(cfg, "gist")
    state = jax.eval_shape(lambda p: steps.init_state({"gist": p}, optimizer,
                                                      ema=tc.ema_decay > 0), gist)
    mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    sharded = steps.jit_step(step, optimizer, mesh, state, base_params, tc.batch_size,
                             ema_decay=tc.ema_decay)
    tokens = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    compiled, seconds = _compile(sharded.train, state, base_params, tokens, rng, log=log,
                                 name="gist_train_step")
    meta = {"layouts": list(layouts), "batch_size": tc.batch_size, "seq_len": tc.seq_len,
            "dense": tc.gist_dense, "trainable_bytes": _tree_bytes(gist)}
    return compiled, seconds, meta


def project_model(llama: LlamaConfig, cfg: ExperimentConfig, *,
                  programs: Sequence[str] = PROGRAMS, device: Device = H100_SXM,
                  batch_size: int = 1, log: Callable[[str], None] | None = None) -> dict:
    """Compile `programs` (names from PROGRAMS) for base model `llama` under experiment
    `cfg` (its W_max; `cfg.base_config` must be `llama`) from abstract inputs and return
    their JSON record: per program XLA:CPU's memory and cost analyses, the loop-aware
    costs per unit (a decode token, a refocus, a train step) and their time bounds on
    `device`, plus the decode comparison (`"decode"`) when both decode programs ran."""
    from mcjax.base import model as base
    from mcjax.runtime.programs import programs as runtime_programs
    from mcjax.runtime.state import make_plan

    unknown = [p for p in programs if p not in PROGRAMS and not p.startswith("refocus:")]
    if unknown:
        raise ValueError(f"unknown programs {unknown}; known: {', '.join(PROGRAMS)}")
    if cfg.base_config != llama:
        raise ConfigError("cfg.base_config must be the projected base model "
                          "(see projection_experiment)")
    mc = cfg.mc
    K, W = mc.block_size, mc.w_max
    params = _abstract_params(llama)
    out: dict[str, Any] = {
        "base": dataclasses.asdict(llama),
        "params_bytes": _tree_bytes(params),
        "w_max": W, "block_size": K, "batch_size": batch_size, "programs": {},
    }

    if "plain_decode" in programs:
        cache = jax.eval_shape(lambda: base.init_cache(llama, batch_size, W))
        ids = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        jitted = jax.jit(base.decode_step_unchecked, static_argnames=("config",),
                         donate_argnames=("cache",))
        compiled, s = _compile(_Bound(jitted, llama), params, cache, ids, ids,
                               jax.ShapeDtypeStruct((), jnp.int32), log=log,
                               name="plain_decode")
        pc = hlo_cost.program_cost(compiled.as_text())
        analytic = analytic_decode(llama, W)
        rec = _program("plain_decode", compiled, s, pc, "decode token",
                          {"token": pc.total()}, device,
                          {"cache_slots": W, "analytic": analytic})
        out["programs"]["plain_decode"] = rec

    plans = {}
    for name in programs:
        if name == "session_decode" or name.startswith("refocus:"):
            policy = "lens" if name == "session_decode" else name.split(":", 1)[1]
            plans[name] = make_plan(llama, cfg, batch_size=batch_size, focus_policy=policy)

    if "session_decode" in programs:
        plan = plans["session_decode"]
        x = _session_inputs(plan, cfg, llama)
        jitted = runtime_programs(plan).decode
        compiled, s = _compile(jitted, params, x["state"], x["i32"](), x["i32"](), log=log,
                               name="session_decode")
        pc = hlo_cost.program_cost(compiled.as_text())
        rec = _program("session_decode", compiled, s, pc, "decode token",
                          {"token": _decode_step_cost(pc, K)}, device,
                          {"cache_slots": plan.num_slots,
                           "analytic": analytic_decode(llama, plan.num_slots)})
        out["programs"]["session_decode"] = rec

    for name in programs:
        if not name.startswith("refocus:"):
            continue
        plan = plans[name]
        x = _session_inputs(plan, cfg, llama)
        jitted = runtime_programs(plan).refocus
        B = batch_size
        compiled, s = _compile(jitted, params, x["focus"], x["state"], x["view"], x["i32"](B),
                               x["pred"](B), x["layout"], x["pred"](B), x["pred"](), log=log,
                               name=name)
        pc = hlo_cost.program_cost(compiled.as_text())
        analytic = {k: {**v, **device.seconds(hlo_cost.HloCost(v["bytes"], v["flops"]))}
                    for k, v in analytic_refocus(llama, plan).items()}
        rec = _program(name, compiled, s, pc, "refocus", _refocus_scenarios(pc, plan), device,
                       {"analytic": analytic,
                        "plan": {"focus_policy": plan.focus_policy,
                                 "max_tokens": plan.max_tokens,
                                 "headroom": plan.headroom,
                                 "prefill_chunk": plan.prefill_chunk,
                                 "settle_rounds": plan.settle_rounds,
                                 "keeps_keys": plan.keeps_keys,
                                 "kv_reuse": plan.kv_reuse,
                                 "decode_focus": plan.decode_focus}})
        out["programs"][name] = rec

    if "gist_train_step" in programs:
        compiled, s, meta = _gist_train_step(cfg, params, log)
        pc = hlo_cost.program_cost(compiled.as_text())
        tokens = cfg.train.batch_size * cfg.train.seq_len
        rec = _program("gist_train_step", compiled, s, pc, "train step",
                          {"step": pc.total()}, device, {"train": meta,
                                                         "tokens_per_step": tokens})
        out["programs"]["gist_train_step"] = rec

    out["decode"] = _decode_comparison(out, device)
    return out


class _Bound:
    """`jitted` with the static config bound, lowerable from positional abstract args."""

    def __init__(self, jitted, config):
        self.jitted, self.config = jitted, config

    def lower(self, params, *args):
        return self.jitted.lower(params, self.config, *args)


def _decode_comparison(out: dict, device: Device) -> dict:
    """Decode tokens/s bounds of the plain model and of a session (its decode step alone,
    and with refocuses amortized: one per K tokens, plus a full re-prefill every
    `headroom` tokens or — worst case — every K tokens), and their ratios."""
    progs = out["programs"]
    if "plain_decode" not in progs or "session_decode" not in progs:
        return {}
    K = out["block_size"]
    bw, peak = device.hbm_bytes_per_s, device.bf16_flops_per_s

    def rate(cost: Mapping[str, float]) -> dict[str, float]:
        hbm = bw / cost["bytes"] if cost["bytes"] else math.inf
        flop = peak / cost["flops"] if cost["flops"] else math.inf
        return {"hbm_bound_tok_s": hbm, "flop_bound_tok_s": flop,
                "tok_s": min(hbm, flop)}

    plain, sess = progs["plain_decode"], progs["session_decode"]
    res = {
        "plain": {"walk": rate(plain["per_unit"]["token"]),
                  "analytic": rate(plain["analytic"])},
        "session_step": {"walk": rate(sess["per_unit"]["token"]),
                         "analytic": rate(sess["analytic"])},
    }
    for kind in ("walk", "analytic"):
        res.setdefault("ratio_step", {})[kind] = (res["session_step"][kind]["tok_s"]
                                                  / res["plain"][kind]["tok_s"])
    refocus = progs.get("refocus:lens") or progs.get("refocus:retrieval")
    if refocus is not None:
        headroom = refocus["plan"]["headroom"] or K
        res["amortized"] = {"refocus_program": refocus["program"],
                            "headroom_tokens": headroom}
        sources = {"walk": (sess["per_unit"]["token"], plain["per_unit"]["token"],
                            refocus["per_unit"]),
                   "analytic": (sess["analytic"], plain["analytic"], refocus["analytic"])}
        def bound(c: Mapping[str, float]) -> float:
            return device.seconds(hlo_cost.HloCost(c["bytes"], c["flops"]))["bound_s"]

        for kind, (step, ref, scen) in sources.items():
            t_step, t_plain = bound(step), bound(ref)
            app, full = bound(scen["append"]), bound(scen["full_reprefill"])
            cases = {"append_every_K": t_step + app / K,
                     "reprefill_every_headroom": t_step + app / K + (full - app) / headroom,
                     "reprefill_every_K": t_step + full / K}
            for case, t in cases.items():
                res["amortized"].setdefault(case, {})[kind] = {
                    "tok_s": 1.0 / t, "ratio_to_plain": t_plain / t}
    return res


def project(models: Sequence[str] | Mapping[str, LlamaConfig], *,
            experiment: str = "smollm2_135m_cpu", w_max: int = 8192,
            programs: Sequence[str] = PROGRAMS, device: Device = H100_SXM,
            log: Callable[[str], None] | None = None) -> dict:
    """`project_model` for each named model (MODELS' keys, or {name: LlamaConfig}) under
    `projection_experiment(model, experiment=..., w_max=...)`; one JSON-able record."""
    if not isinstance(models, Mapping):
        missing = [m for m in models if m not in MODELS]
        if missing:
            raise ValueError(f"unknown models {missing}; known: {', '.join(MODELS)}")
        models = {m: MODELS[m] for m in models}
    out = {"meta": {"jax": jax.__version__, "backend": jax.default_backend(),
                    "compiled_on": str(jax.devices()[0].device_kind),
                    "device": dataclasses.asdict(device), "experiment": experiment,
                    "w_max": w_max, "programs": list(programs)},
           "models": {}}
    for name, llama in models.items():
        if log:
            log(f"{name}:")
        cfg, notes = projection_experiment(llama, experiment=experiment, w_max=w_max)
        t0 = time.perf_counter()
        rec = project_model(llama, cfg, programs=programs, device=device, log=log)
        rec["experiment"] = notes
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        out["models"][name] = rec
    return out


# --------------------------------------------------------------------------- report


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _seconds(x: float) -> str:
    return f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.3g} ms"


def markdown(result: dict) -> str:
    """Markdown tables of a `project` result: per program XLA:CPU's memory and cost
    analyses and the loop-aware cost per unit with its H100 bound; then decode tokens/s."""
    dev = result["meta"]["device"]
    lines = []
    for model, rec in result["models"].items():
        lines.append(f"### {model} — W_max {rec['w_max']:,}, bf16, batch 1, on "
                     f"{dev['name']}")
        lines.append("")
        lines.append("| program | compile s | XLA:CPU memory_analysis: args / out / temp / "
                     "code | XLA:CPU cost_analysis FLOPs / bytes (each loop body once) | "
                     "unit | walk FLOPs / bytes per unit | H100 bound per unit |")
        lines.append("| --- | ---: | --- | --- | --- | --- | --- |")
        for name, p in rec["programs"].items():
            m, x = p["memory_analysis"], p["xla_cost_analysis"]
            mem = " / ".join(_si(m.get(k, 0), "B") for k in ("argument_bytes", "output_bytes",
                                                          "temp_bytes",
                                                          "generated_code_bytes"))
            for i, (scenario, u) in enumerate(p["per_unit"].items()):
                unit = p["unit"] if len(p["per_unit"]) == 1 else f"{p['unit']}: {scenario}"
                head = (f"| {name} | {p['compile_s']:.0f} | {mem} | {_si(x['flops'])} / "
                        f"{_si(x['bytes_accessed'], 'B')}" if i == 0 else "| | | |")
                lines.append(f"{head} | {unit} | {_si(u['flops'])} / {_si(u['bytes'], 'B')} "
                             f"| {_seconds(u['bound_s'])} "
                             f"({'HBM' if u['hbm_s'] >= u['flop_s'] else 'FLOP'}) |")
        dec = rec.get("decode")
        if dec:
            lines.append("")
            lines.append("| decode, H100 bound | walk tok/s (HBM / FLOP bound) | analytic "
                         "tok/s (HBM / FLOP) | ratio to plain (walk / analytic) |")
            lines.append("| --- | --- | --- | --- |")
            for key, label in (("plain", "plain model, W_max-slot cache"),
                               ("session_step", "session decode step")):
                w, a = dec[key]["walk"], dec[key]["analytic"]
                ratio = ("1" if key == "plain" else
                         f"{dec['ratio_step']['walk']:.3f} / {dec['ratio_step']['analytic']:.3f}")
                lines.append(f"| {label} | {w['tok_s']:.0f} ({w['hbm_bound_tok_s']:.0f} / "
                             f"{w['flop_bound_tok_s']:.0f}) | {a['tok_s']:.0f} "
                             f"({a['hbm_bound_tok_s']:.0f} / {a['flop_bound_tok_s']:.0f}) | "
                             f"{ratio} |")
            am = dec.get("amortized")
            if am:
                for key, label in (("append_every_K", "session, + an append-only refocus "
                                                      "every K tokens"),
                                   ("reprefill_every_headroom",
                                    f"… + a full re-prefill every {am['headroom_tokens']} "
                                    f"tokens"),
                                   ("reprefill_every_K", "… a full re-prefill every K "
                                                         "tokens (worst)")):
                    w, a = am[key]["walk"], am[key]["analytic"]
                    lines.append(f"| {label} | {w['tok_s']:.0f} | {a['tok_s']:.0f} | "
                                 f"{w['ratio_to_plain']:.3f} / {a['ratio_to_plain']:.3f} |")
        lines.append("")
    return "\n".join(lines)
