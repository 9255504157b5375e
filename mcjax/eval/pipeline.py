"""One evaluation run (SPEC §2.9): every measurement and baseline in the same process.

`run_evaluation(EvalOptions(...))` validates the settings (before any model is loaded),
loads the frozen base model and the nets (`mcjax.nets.resolve_networks`), then measures

1. ΔNLL@H against compression ratio — full context, GistNet, untrained GistNet, mean-pooled
   embeddings, mean-pooled read-pass hidden states, truncation — on held-out windows that
   each lie inside one document (`baselines.per_window_nll`), with every variant's paired
   difference to truncation ± SE and the gap it recovers (`baselines.paired_rows`,
   "dnll_paired"); per-window NLLs go to per_window_nll.npz (section "nll", alias "dnll");
2. passkey accuracy against history length at a fixed W_max — MegaContext sessions with
   LensNet, random and recency focus, the sliding window of W_max tokens, and full context
   where it fits (explicitly "skipped: does not fit ..." otherwise);
3. focus quality — LensNet (and the recency / random baselines) against measured
   counterfactual utility;
4. (only when asked: section "ceiling") the embedding-space ceiling — free vectors
   optimised per window in the gist slots (`mcjax.eval.ceiling`);

and returns the results dict (`report.write_outputs` turns it into results.json,
report.md, the plots and, from its "arrays" entry, the per-window .npz files). ΔNLL and
focus quality use the config's MegaContext settings (as trained); the passkey sessions use
`w_max`.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any

import jax

import numpy as np

from mcjax import counterfactuals, data
from mcjax import working_context as wcm
from mcjax.config import ConfigError, ExperimentConfig, config_to_json, get_config, override
from mcjax.eval import baselines, ceiling, metrics, tasks
from mcjax.eval.tasks import EvalInputError
from mcjax.nets import Networks, checkpoint_parts, resolve_networks
from mcjax.scoring import Frozen, load_frozen

__all__ = ["EvalOptions", "SECTIONS", "DEFAULT_SECTIONS", "METHODS", "run_evaluation",
           "validate", "sections_of", "held_out_windows"]

SECTIONS = ("nll", "passkey", "focus", "ceiling")
DEFAULT_SECTIONS = ("nll", "passkey", "focus")  # the ceiling is expensive: only when asked
SECTION_ALIASES = {"dnll": "nll"}
HELD_OUT_SEED = 1234  # as `data.held_out_batches`: the same windows as training's eval
METHODS = ("megacontext_lens", "megacontext_random", "megacontext_recency",
           "megacontext_retrieval", "sliding_window", "full_context")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    checkpoint: str | None = None
    gist_checkpoint: str | None = None
    lens_checkpoint: str | None = None
    gist_params: str | None = None  # params-only GistNet .safetensors (+ .json card)
    untrained: bool = False
    config: str = "smollm2_135m_cpu"
    overrides: tuple[str, ...] = ()
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    # ΔNLL@H / focus quality
    nll_batches: int = 2  # held-out batches of train.batch_size windows
    windows: int | None = None  # ΔNLL windows (overrides nll_batches · batch size)
    nll_batch_size: int | None = None  # windows per forward (default: train.batch_size)
    focus_batches: int = 4  # held-out batches for focus quality
    focus_candidates: int = 8  # candidate actions per window (half expansions)
    keep_raw: tuple[int, ...] | None = None  # raw tail blocks per layout (default: a sweep)
    # ΔNLL variants (default: all this config can run); truncation and full are always in
    nll_variants: tuple[str, ...] | None = None
    # passkey
    lengths: tuple[int, ...] | None = None  # default: the config's eval.history_lengths
    w_max: int | None = None  # default: the config's mc.w_max
    cases: int = 4
    refocus_steps: int = 2
    max_new_tokens: int | None = None  # default: longest answer + 4
    haystack: str = "filler"  # filler | held_out
    task: str = "passkey"  # tasks.PASSKEY_TASKS: the passkey or a look-alike task
    needles: int = 8  # needles per case of the multikey look-alike tasks
    methods: tuple[str, ...] = METHODS  # passkey methods to run (report order)
    full_memory_gb: float = 6.0
    # ceiling
    ceiling_windows: int = 16
    ceiling_steps: int = 300
    ceiling_lr: float = 0.1  # Adam step in units of the token-embedding RMS
    ceiling_layouts: tuple[str, ...] = ("lod1_keep1",)
    ceiling_batch_size: int | None = None  # default: min(ceiling_windows, 8)
    ceiling_init: str = "mean_pool"  # "mean_pool" | "gistnet" (the evaluated GistNet's gists)
    ceiling_fit: str = "continuation"  # "continuation" | "tail" (the continuation held out)
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


def sections_of(opts: EvalOptions) -> tuple[str, ...]:
    """The requested sections, aliases resolved ("dnll" is "nll"), in SECTIONS order."""
    asked = {SECTION_ALIASES.get(s, s) for s in opts.sections}
    unknown = asked - set(SECTIONS)
    if unknown or not asked:
        raise EvalInputError(f"sections must be a non-empty subset of "
                             f"{SECTIONS + tuple(SECTION_ALIASES)}, got {list(opts.sections)}")
    return tuple(s for s in SECTIONS if s in asked)


def nll_windows(opts: EvalOptions, cfg: ExperimentConfig) -> tuple[int, int]:
    """(ΔNLL windows, windows per forward)."""
    bs = opts.nll_batch_size or cfg.train.batch_size
    return (opts.windows if opts.windows is not None else opts.nll_batches * bs), bs


def _prefix_len(cfg: ExperimentConfig) -> int:
    return cfg.train.seq_len - cfg.mc.horizon


def validate(opts: EvalOptions) -> ExperimentConfig:
    """Check every setting that can be checked without loading a model; returns the config
    (with a params file's GistNet architecture, from its card)."""
    cfg = _config(opts)
    if opts.gist_params is not None:
        from mcjax import assets

        if not Path(opts.gist_params).is_file():
            raise assets.AssetError(f"params file {opts.gist_params!r} does not exist")
        cfg = assets.apply_card(cfg, assets.read_card(opts.gist_params))
    sections = sections_of(opts)
    if opts.nll_batches < 1 or opts.focus_batches < 1:
        raise EvalInputError("--nll-batches / --focus-batches must be >= 1")
    if opts.windows is not None and opts.windows < 1:
        raise EvalInputError(f"--windows must be >= 1, got {opts.windows}")
    if opts.nll_batch_size is not None and opts.nll_batch_size < 1:
        raise EvalInputError(f"--nll-batch-size must be >= 1, got {opts.nll_batch_size}")
    if "ceiling" in sections:
        if opts.ceiling_windows < 1:
            raise EvalInputError(f"--ceiling-windows must be >= 1, got {opts.ceiling_windows}")
        if opts.ceiling_batch_size is not None and opts.ceiling_batch_size < 1:
            raise EvalInputError("--ceiling-batch-size must be >= 1")
        try:
            _ceiling_config(opts)
        except ValueError as e:
            raise EvalInputError(f"ceiling: {e}") from e
        tasks.layouts_by_name(cfg.mc, _prefix_len(cfg), opts.ceiling_layouts)
    if opts.focus_candidates < 2:
        raise EvalInputError("--focus-candidates must be >= 2 (an expansion and a collapse)")
    if "passkey" in sections:
        unknown = [m for m in opts.methods if m not in METHODS]
        if unknown or not opts.methods or len(set(opts.methods)) != len(opts.methods):
            raise EvalInputError(f"--methods must name distinct methods of {METHODS}, got "
                                 f"{list(opts.methods)}")
        w_max = opts.w_max or cfg.mc.w_max
        _passkey_mc(cfg, w_max)
        tasks.check_lengths(passkey_lengths(opts, cfg), w_max)
        if opts.cases < 1:
            raise EvalInputError(f"--cases must be >= 1, got {opts.cases}")
        if opts.refocus_steps < 0:
            raise EvalInputError("--refocus-steps must be >= 0")
        if opts.haystack not in ("filler", "held_out"):
            raise EvalInputError(f"--haystack must be filler|held_out, got {opts.haystack!r}")
        if opts.task not in tasks.PASSKEY_TASKS:
            raise EvalInputError(f"--task must be one of {', '.join(tasks.PASSKEY_TASKS)}, "
                                 f"got {opts.task!r}")
        if opts.needles < 2:
            raise EvalInputError(f"--needles must be >= 2, got {opts.needles}")
        if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
            raise EvalInputError("--max-new-tokens must be >= 1")
    if "nll" in sections:
        tasks.nll_layouts(cfg.mc, _prefix_len(cfg), opts.keep_raw)
        if opts.nll_variants is not None:
            unknown = [v for v in opts.nll_variants if v not in baselines.NLL_VARIANTS]
            if unknown:
                raise EvalInputError(f"unknown --variants {unknown}; known: "
                                     f"{', '.join(baselines.NLL_VARIANTS)}")
    # fail fast on a missing / empty checkpoint directory (before loading the base model)
    for d in (opts.checkpoint, opts.gist_checkpoint, opts.lens_checkpoint):
        if d is not None:
            checkpoint_parts(d)
    if opts.gist_params is not None and opts.gist_checkpoint is not None:
        raise EvalInputError("give --gist-params or --gist-checkpoint, not both")
    given = any(d is not None for d in (opts.checkpoint, opts.gist_checkpoint,
                                        opts.lens_checkpoint, opts.gist_params))
    if opts.untrained and given:
        raise EvalInputError("--untrained evaluates the untrained nets on purpose: do not "
                             "combine it with --checkpoint / --gist-checkpoint / "
                             "--lens-checkpoint / --gist-params (not both)")
    # neither: the shipped GistNet when it fits the config (else a clear error, later, from
    # resolve_networks once the base model's architecture is known)
    return cfg


def held_out_windows(frozen: Frozen, num: int, seq_len: int, seed: int = HELD_OUT_SEED
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`num` held-out windows [num, seq_len], each inside one document
    (`data.document_windows`, the windows `data.held_out_batches` gives for the same
    count; a sample of n windows is contained in every larger one), and where each lies:
    corpus offset, document index, document id and offset inside the document."""
    corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                   separator=frozen.separator, progress=False)
    try:
        windows = data.document_windows(corpus, seq_len, num, seed=seed)
    except data.DataError as e:
        raise EvalInputError(f"held-out windows: {e}") from e
    return windows, tasks.locate_windows(corpus, windows)


def passkey_lengths(opts: EvalOptions, cfg: ExperimentConfig) -> tuple[int, ...]:
    """History lengths of the passkey sweep: the options', else the config's."""
    return tuple(opts.lengths) if opts.lengths is not None else tuple(
        sorted(set(cfg.eval.history_lengths)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def passkey_max_tokens(length: int, max_new_tokens: int, mc) -> int:
    """The session capacity a passkey run of `length`-token histories and answers of up to
    `max_new_tokens` uses (a power of two, at least W_max)."""
    return max(mc.w_max, _next_pow2(length + max_new_tokens + mc.block_size))


def _passkey(opts: EvalOptions, frozen: Frozen, decode, nets: Networks,
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
    cases = {L: tasks.passkey_cases(frozen.encode, L, opts.cases, opts.seed, haystack=haystack,
                                    task=opts.task, num_needles=opts.needles)
             for L in lengths}
    answer_len = max(len(c.answer) for cs in cases.values() for c in cs)
    new = opts.max_new_tokens or answer_len + 4
    max_tokens = passkey_max_tokens(max(lengths), new, mc)
    limit = opts.full_memory_gb * 2**30
    section: dict[str, Any] = {
        "w_max": mc.w_max, "lengths": list(lengths), "cases": opts.cases,
        "haystack": opts.haystack, "task": opts.task,
        "task_note": tasks.PASSKEY_TASK_NOTES[opts.task]
        + (f" ({opts.needles} needles)" if opts.task.startswith(("multikey", "near")) else ""),
        "max_new_tokens": new, "refocus_steps": opts.refocus_steps,
        "scoring": metrics.PASSKEY_SCORING, "full_context_memory_limit_gb": opts.full_memory_gb,
        "methods": {m: {} for m in opts.methods}, "notes": []}
    if "lens" in nets.untrained:
        section["notes"].append("LensNet is untrained: 'MegaContext, LensNet focus' uses "
                                "random-init LensNet scores.")
    if "gist" in nets.untrained:
        section["notes"].append("GistNet is untrained: every MegaContext method sees "
                                "random-init gists.")
    focus_map = None
    record_at = max(lengths)
    bar = tqdm(total=len(lengths) * len(opts.methods), desc="passkey methods x lengths",
               disable=not opts.progress)
    for L in lengths:
        cs = cases[L]
        histories = [c.tokens for c in cs]
        for method in opts.methods:
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
                        focus_seed=opts.seed,
                        record_focus=(L == record_at and focus_map is None
                                      and policy in ("lens", "retrieval")),
                        progress=opts.progress)
                    if run.focus_snapshots is not None:
                        final = run.focus_snapshots[-1]["runs"]
                        focus_map = {"method": method, "length": L, "stream": 0,
                                     "block_size": mc.block_size,
                                     "needle_span": list(cs[0].needle_span),
                                     "snapshots": run.focus_snapshots,
                                     "text": wcm.format_focus_map([tuple(r) for r in final])}
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
    sections = sections_of(opts)
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    try:
        nets = resolve_networks(
            cfg, frozen.params, checkpoint=opts.checkpoint,
            gist_checkpoint=opts.gist_checkpoint, lens_checkpoint=opts.lens_checkpoint,
            gist_params=opts.gist_params, untrained=opts.untrained)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    timings: dict[str, float] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    results: dict[str, Any] = {"meta": {
        "config_name": cfg.name, "config": config_to_json(cfg), "overrides": list(opts.overrides),
        "options": dataclasses.asdict(opts), "command": opts.command, "base": cfg.base,
        "sections": list(sections),
        "block_size": cfg.mc.block_size, "num_levels": cfg.mc.num_levels,
        "horizon": cfg.mc.horizon, "sink_blocks": cfg.mc.sink_blocks,
        "networks": nets.sources, "untrained": list(nets.untrained),
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} "
                  f"({jax.devices()[0].device_kind})",
        "jax": jax.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "timings": timings, "arrays": arrays}
    seq_len = cfg.train.seq_len

    if "nll" in sections:
        t0 = time.perf_counter()
        n, bs = nll_windows(opts, cfg)
        windows, ids = held_out_windows(frozen, n, seq_len)
        layouts = tasks.nll_layouts(cfg.mc, _prefix_len(cfg), opts.keep_raw)
        variants = None if opts.nll_variants is None else tuple(dict.fromkeys(
            ("full", *opts.nll_variants, "truncation")))
        pw = baselines.per_window_nll(frozen, nets.gist, nets.untrained_gist, windows, layouts,
                                      batch_size=bs, window_ids=ids, progress=opts.progress,
                                      variants=variants)
        results["delta_nll"] = {**baselines.summarize_delta_nll(pw), "batch_size": bs,
                                "paired_note": metrics.PAIRED_NOTE,
                                "per_window_file": "per_window_nll.npz"}
        results["dnll_paired"] = baselines.paired_rows(pw)
        arrays["per_window_nll.npz"] = pw.arrays()
        timings["delta_nll_s"] = time.perf_counter() - t0
    if "focus" in sections:
        t0 = time.perf_counter()
        bs = cfg.train.batch_size
        try:
            task = counterfactuals.lens_task(cfg, opts.focus_candidates, retrieval=True)
        except ValueError as e:
            results["focus_quality"] = {"skipped": f"skipped: {e}"}
        else:
            windows, _ = held_out_windows(frozen, opts.focus_batches * bs, seq_len)
            batches = [windows[i * bs: (i + 1) * bs] for i in range(opts.focus_batches)]
            results["focus_quality"] = baselines.focus_quality(
                frozen, nets.gist, nets.lens, batches, task, seed=opts.seed,
                progress=opts.progress)
        timings["focus_quality_s"] = time.perf_counter() - t0
    if "ceiling" in sections:
        t0 = time.perf_counter()
        results["ceiling"], arrays["ceiling_per_window.npz"] = _ceiling(opts, frozen, nets)
        timings["ceiling_s"] = time.perf_counter() - t0
    if "passkey" in sections:
        results["passkey"], results["focus_map"] = _passkey(opts, frozen, frozen.decode, nets,
                                                            timings)
    results["meta"]["seconds"] = time.perf_counter() - t_start
    return results


def _ceiling_config(opts) -> "ceiling.CeilingConfig":
    return ceiling.CeilingConfig(steps=opts.ceiling_steps, learning_rate=opts.ceiling_lr,
                                 init=opts.ceiling_init, fit=opts.ceiling_fit)


def _ceiling(opts: EvalOptions, frozen: Frozen, nets: Networks
             ) -> tuple[dict, dict[str, np.ndarray]]:
    """The ceiling section at each asked layout on the first held-out windows (a subset of
    the ΔNLL windows), with the GistNet on the same windows for comparison."""
    from mcjax.gist import embedding_rms

    cfg = frozen.cfg
    specs = tasks.layouts_by_name(cfg.mc, _prefix_len(cfg), opts.ceiling_layouts)
    windows, ids = held_out_windows(frozen, opts.ceiling_windows, cfg.train.seq_len)
    ccfg = _ceiling_config(opts)
    bs = opts.ceiling_batch_size or min(opts.ceiling_windows, 8)
    results = [ceiling.optimize_ceiling(frozen.params, cfg.base_config, windows, spec, ccfg,
                                        batch_size=bs, progress=opts.progress,
                                        gist_params=nets.gist, gist_cfg=cfg.gist)
               for spec in specs]
    section = ceiling.ceiling_section(results, embedding_rms_value=embedding_rms(frozen.params))
    section.update({"windows": int(len(windows)), "batch_size": bs,
                    "window_offsets": ids["offset"].tolist(),
                    "per_window_file": "ceiling_per_window.npz"})
    # the evaluated GistNet on the same windows and targets (forward only)
    pw = baselines.per_window_nll(frozen, nets.gist, nets.untrained_gist, windows, specs,
                                  batch_size=bs, variants=("full", "gistnet", "truncation"))
    for row in section["layouts"]:
        nll = pw.nll[row["layout"]]
        row["gistnet"] = metrics.paired_vs_truncation(nll["gistnet"], nll["truncation"],
                                                      nll["full"])
        row["gistnet_source"] = nets.sources["gist"]["source"]
    arrays = {k: v for r in results for k, v in r.arrays().items()}
    arrays.update({f"{r.layout.name}/nll_gistnet": pw.nll[r.layout.name]["gistnet"]
                   for r in results})
    arrays.update({f"window/{k}": np.asarray(v) for k, v in ids.items()})
    return section, arrays
