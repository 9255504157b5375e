"""One evaluation run (SPEC §2.9): every measurement and baseline in the same process.

`run_evaluation(EvalOptions(...))` validates the settings (before any model is loaded),
loads the frozen base model and the nets (`networks.resolve_networks`), then measures

1. ΔNLL@H against compression ratio — full context, GistNet, untrained GistNet, mean-pooled
   embeddings, truncation — on held-out windows (`baselines.delta_nll_sweep`);
2. passkey accuracy against history length at a fixed W_max — MegaContext sessions with
   LensNet, random and recency focus, the sliding window of W_max tokens, and full context
   where it fits (explicitly "skipped: does not fit ..." otherwise);
3. focus quality — LensNet (and the recency / random baselines) against measured
   counterfactual utility;

and returns the results dict (`report.write_outputs` turns it into results.json,
report.md and the plots). ΔNLL and focus quality use the config's MegaContext settings
(as trained); the passkey sessions use `w_max`.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Callable

import jax

from mcjax import working_context as wcm
from mcjax.config import ConfigError, ExperimentConfig, get_config, override
from mcjax.eval import baselines, metrics, networks, tasks
from mcjax.eval.tasks import EvalInputError
from mcjax.runtime import format_focus_map
from mcjax.train import data, loop

__all__ = ["EvalOptions", "SECTIONS", "METHODS", "run_evaluation", "validate", "load_base"]

SECTIONS = ("nll", "passkey", "focus")
METHODS = ("megacontext_lens", "megacontext_random", "megacontext_recency", "sliding_window",
           "full_context")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    checkpoint: str | None = None
    gist_checkpoint: str | None = None
    lens_checkpoint: str | None = None
    untrained: bool = False
    config: str = "smollm2_135m_cpu"
    overrides: tuple[str, ...] = ()
    sections: tuple[str, ...] = SECTIONS
    # ΔNLL@H / focus quality
    nll_batches: int = 2  # held-out batches of train.batch_size windows
    focus_batches: int = 4  # held-out batches for focus quality
    focus_candidates: int = 8  # candidate actions per window (half expansions)
    keep_raw: tuple[int, ...] | None = None  # raw tail blocks per layout (default: a sweep)
    # passkey
    lengths: tuple[int, ...] | None = None  # default: the config's eval.history_lengths
    w_max: int | None = None  # default: the config's mc.w_max
    cases: int = 4
    refocus_steps: int = 2
    max_new_tokens: int | None = None  # default: longest answer + 4
    haystack: str = "filler"  # filler | held_out
    full_memory_gb: float = 6.0
    seed: int = 0
    progress: bool = True
    command: str = ""


def _config(opts: EvalOptions) -> ExperimentConfig:
    try:
        return get_config(opts.config, list(opts.overrides))
    except ConfigError as e:
        raise EvalInputError(str(e)) from e


def _passkey_mc(cfg: ExperimentConfig, w_max: int) -> ExperimentConfig:
    try:
        cfg = override(cfg, {"mc.w_max": w_max})
    except ConfigError as e:
        raise EvalInputError(f"--w-max {w_max}: {e}") from e
    if w_max % cfg.mc.block_size:
        raise EvalInputError(f"--w-max {w_max} must be a multiple of the block size "
                             f"{cfg.mc.block_size}")
    return cfg


def validate(opts: EvalOptions) -> ExperimentConfig:
    """Check every setting that can be checked without loading a model; returns the config."""
    cfg = _config(opts)
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown or not opts.sections:
        raise EvalInputError(f"sections must be a non-empty subset of {SECTIONS}, got "
                             f"{list(opts.sections)}")
    if opts.nll_batches < 1 or opts.focus_batches < 1:
        raise EvalInputError("--nll-batches / --focus-batches must be >= 1")
    if opts.focus_candidates < 2:
        raise EvalInputError("--focus-candidates must be >= 2 (an expansion and a collapse)")
    if "passkey" in opts.sections:
        w_max = opts.w_max or cfg.mc.w_max
        _passkey_mc(cfg, w_max)
        tasks.check_lengths(passkey_lengths(opts, cfg), w_max)
        if opts.cases < 1:
            raise EvalInputError(f"--cases must be >= 1, got {opts.cases}")
        if opts.refocus_steps < 0:
            raise EvalInputError("--refocus-steps must be >= 0")
        if opts.haystack not in ("filler", "held_out"):
            raise EvalInputError(f"--haystack must be filler|held_out, got {opts.haystack!r}")
        if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
            raise EvalInputError("--max-new-tokens must be >= 1")
    if "nll" in opts.sections:
        tasks.nll_layouts(cfg.mc, cfg.train.seq_len - cfg.mc.horizon, opts.keep_raw)
    # fail fast on a missing / empty checkpoint directory (before loading the base model)
    for d in (opts.checkpoint, opts.gist_checkpoint, opts.lens_checkpoint):
        if d is not None:
            networks.checkpoint_parts(d)
    if opts.untrained == any(d is not None for d in (opts.checkpoint, opts.gist_checkpoint,
                                                     opts.lens_checkpoint)):
        raise EvalInputError("pass --checkpoint DIR (or --gist-checkpoint / --lens-checkpoint)"
                             ", or --untrained to evaluate untrained nets on purpose; not both")
    return cfg


def passkey_lengths(opts: EvalOptions, cfg: ExperimentConfig) -> tuple[int, ...]:
    """History lengths of the passkey sweep: the options', else the config's."""
    return tuple(opts.lengths) if opts.lengths is not None else tuple(
        sorted(set(cfg.eval.history_lengths)))


def load_base(cfg: ExperimentConfig) -> tuple[loop.Frozen, Callable[[Any], str]]:
    """The frozen base model as training sees it (`loop.load_frozen`'s Frozen, same
    tokenizer id so the cached held-out corpus is shared) and a decoder for its tokens."""
    if cfg.base == "random":
        return loop.load_frozen(cfg), tasks.byte_decode
    from mcjax.base.loading import load_base_model

    model = load_base_model(cfg.base)
    cfg = dataclasses.replace(cfg, base_config=model.config)
    frozen = loop.Frozen(cfg, model.params, model.encode, cfg.base,
                         model.config.eos_token_id or 0)
    return frozen, model.decode


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _passkey(opts: EvalOptions, frozen: loop.Frozen, decode, nets: networks.Networks,
             timings: dict) -> tuple[dict, dict | None]:
    from tqdm.auto import tqdm

    cfg = _passkey_mc(frozen.cfg, opts.w_max or frozen.cfg.mc.w_max)
    lengths = passkey_lengths(opts, cfg)
    mc, llama = cfg.mc, frozen.cfg.base_config
    eos = llama.eos_token_id
    haystack = None
    if opts.haystack == "held_out":
        haystack = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                         separator=frozen.separator, progress=False).tokens
    cases = {L: tasks.passkey_cases(frozen.encode, L, opts.cases, opts.seed, haystack=haystack)
             for L in lengths}
    answer_len = max(len(c.answer) for cs in cases.values() for c in cs)
    new = opts.max_new_tokens or answer_len + 4
    max_tokens = max(mc.w_max, _next_pow2(max(lengths) + new + mc.block_size))
    limit = opts.full_memory_gb * 2**30
    section: dict[str, Any] = {
        "w_max": mc.w_max, "lengths": list(lengths), "cases": opts.cases,
        "haystack": opts.haystack, "max_new_tokens": new, "refocus_steps": opts.refocus_steps,
        "scoring": metrics.PASSKEY_SCORING, "full_context_memory_limit_gb": opts.full_memory_gb,
        "methods": {m: {} for m in METHODS}, "notes": []}
    if "lens" in nets.untrained:
        section["notes"].append("LensNet is untrained: 'MegaContext, LensNet focus' uses "
                                "random-init LensNet scores.")
    if "gist" in nets.untrained:
        section["notes"].append("GistNet is untrained: every MegaContext method sees "
                                "random-init gists.")
    focus_map = None
    record_at = max(lengths)
    bar = tqdm(total=len(lengths) * len(METHODS), desc="passkey methods x lengths",
               disable=not opts.progress)
    for L in lengths:
        cs = cases[L]
        histories = [c.tokens for c in cs]
        for method in METHODS:
            bar.set_postfix(length=L, method=method)
            t0 = time.perf_counter()
            row: dict[str, Any]
            try:
                if method.startswith("megacontext_"):
                    wcm.check_capacity(L + new, mc)
                    policy = method.removeprefix("megacontext_")
                    run = baselines.megacontext_passkey(
                        (llama, frozen.params), nets.gist, nets.lens, cfg, cs, policy=policy,
                        max_new_tokens=new, decode=decode, eos_id=eos,
                        refocus_steps=opts.refocus_steps, max_tokens=max_tokens,
                        focus_seed=opts.seed, record_focus=(policy == "lens" and L == record_at))
                    if run.focus_snapshots is not None:
                        final = run.focus_snapshots[-1]["runs"]
                        focus_map = {"method": method, "length": L, "stream": 0,
                                     "block_size": mc.block_size,
                                     "needle_span": list(cs[0].needle_span),
                                     "snapshots": run.focus_snapshots,
                                     "text": format_focus_map([tuple(r) for r in final])}
                else:
                    if method == "sliding_window":
                        out = baselines.sliding_window_generate(llama, frozen.params, histories,
                                                                mc.w_max, new, eos)
                    else:
                        batch, why = baselines.full_context_fit(llama, L, new, len(cs), limit)
                        if why is not None:
                            raise _Skip(why)
                        out = baselines.full_context_generate(llama, frozen.params, histories,
                                                              new, eos, batch)
                    toks, texts, scores = baselines.score_outputs(out, cs, decode, eos)
                    run = baselines.PasskeyRun(toks, texts, scores)
                row = {"status": "ok", **run.summary(),
                       "examples": [{"key": c.key, "needle_span": list(c.needle_span),
                                     "continuation": t, **s.to_dict()}
                                    for c, t, s in zip(cs, run.texts, run.scores)]}
            except _Skip as e:
                row = {"status": f"skipped: {e}"}
            except wcm.CapacityError as e:
                row = {"status": f"skipped: does not fit the working context: {e}"}
            row["seconds"] = time.perf_counter() - t0
            section["methods"][method][str(L)] = row
            bar.update(1)
    bar.close()
    timings["passkey_s"] = sum(r["seconds"] for per in section["methods"].values()
                               for r in per.values())
    return section, focus_map


class _Skip(Exception):
    """A method that cannot run at a length (reported, never silently dropped)."""


def run_evaluation(opts: EvalOptions) -> dict[str, Any]:
    """Run every requested section; returns the results dict (see the module docstring)."""
    t_start = time.perf_counter()
    cfg = validate(opts)
    frozen, decode = load_base(cfg)
    cfg = frozen.cfg
    try:
        nets = networks.resolve_networks(
            cfg, frozen.params, checkpoint=opts.checkpoint,
            gist_checkpoint=opts.gist_checkpoint, lens_checkpoint=opts.lens_checkpoint,
            untrained=opts.untrained)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    from mcjax.checkpoint import config_to_json

    timings: dict[str, float] = {}
    results: dict[str, Any] = {"meta": {
        "config_name": cfg.name, "config": config_to_json(cfg), "overrides": list(opts.overrides),
        "options": dataclasses.asdict(opts), "command": opts.command, "base": cfg.base,
        "block_size": cfg.mc.block_size, "num_levels": cfg.mc.num_levels,
        "horizon": cfg.mc.horizon, "networks": nets.sources, "untrained": list(nets.untrained),
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} "
                  f"({jax.devices()[0].device_kind})",
        "jax": jax.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "timings": timings}

    need_windows = "nll" in opts.sections or "focus" in opts.sections
    n_focus = opts.focus_batches
    batches = (loop.held_out_batches(frozen, max(opts.nll_batches, n_focus),
                                     cfg.train.batch_size, cfg.train.seq_len)
               if need_windows else [])
    if "nll" in opts.sections:
        t0 = time.perf_counter()
        layouts = tasks.nll_layouts(cfg.mc, cfg.train.seq_len - cfg.mc.horizon, opts.keep_raw)
        results["delta_nll"] = baselines.delta_nll_sweep(
            frozen, nets.gist, nets.untrained_gist, batches[: opts.nll_batches], layouts,
            progress=opts.progress)
        timings["delta_nll_s"] = time.perf_counter() - t0
    if "focus" in opts.sections:
        t0 = time.perf_counter()
        try:
            task = loop.lens_task(cfg, opts.focus_candidates)
        except ValueError as e:
            results["focus_quality"] = {"skipped": f"skipped: {e}"}
        else:
            results["focus_quality"] = baselines.focus_quality(
                frozen, nets.gist, nets.lens, batches[:n_focus], task, seed=opts.seed,
                progress=opts.progress)
        timings["focus_quality_s"] = time.perf_counter() - t0
    if "passkey" in opts.sections:
        results["passkey"], results["focus_map"] = _passkey(opts, frozen, decode, nets,
                                                            timings)
    results["meta"]["seconds"] = time.perf_counter() - t_start
    return results
