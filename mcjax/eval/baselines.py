"""What the evaluation runs: ΔNLL@H of every context variant, passkey generation by each
method (MegaContext sessions with LensNet / random / recency focus, sliding window, full
context), and focus quality (LensNet and baseline scores against measured counterfactual
utility). Library code: no argparse, no printing; progress bars only when asked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import counterfactuals, data
from mcjax import lens as lens_lib
from mcjax import retrieval
from mcjax.base.generate import GreedySampler
from mcjax.config import ExperimentConfig, LlamaConfig
from mcjax.eval import metrics
from mcjax.eval.tasks import LayoutSpec, answer_positions, feed_schedule
from mcjax.runtime import Session, random_scores, recency_scores
from mcjax.scoring import Frozen, variant_nll
from mcjax.statistics import mean_stderr

__all__ = ["NLL_VARIANTS", "PAIRED_VARIANTS", "window_variant_nll", "available_variants",
           "PerWindowNLL", "per_window_nll", "summarize_delta_nll", "paired_rows",
           "delta_nll_sweep", "PasskeyRun",
           "trim_at_eos", "score_outputs", "megacontext_passkey", "sliding_window_generate",
           "full_context_fit", "full_context_generate", "focus_quality", "FOCUS_SCORERS"]

# Context variants of the ΔNLL sweep; "gistnet_untrained" is the GistNet the trainer
# starts from (same seed and init), the others as in `mcjax.scoring.variant_nll`.
NLL_VARIANTS = ("full", "gistnet", "gistnet_untrained", "mean_pool", "mean_pool_hidden",
                "truncation")
# Variants compared with truncation in the paired statistics (truncation itself included:
# its row is the reference, difference 0, gap recovered 0).
PAIRED_VARIANTS = tuple(v for v in NLL_VARIANTS if v != "full")

TARGETS_NOTE = ("targets are the next tokens tokens[P : P + H] of each held-out window "
                "(P = prefix length, H = horizon), identical for every variant; ΔNLL@H = "
                "mean NLL of a variant minus that of the full (uncompressed) context, per "
                "window, then averaged over windows (± standard error over windows)")


# --------------------------------------------------------------------------- ΔNLL@H


def window_variant_nll(frozen: Frozen, gist_params, untrained_gist_params, tokens,
                       layout, variants: Sequence[str] = NLL_VARIANTS) -> dict[str, np.ndarray]:
    """NLL [B, H] of the continuation of each window under each variant (host arrays).
    Every variant scores the same targets tokens[:, P : P + H]."""
    cfg = frozen.cfg
    tokens = jnp.asarray(tokens)
    out = {}
    for v in variants:
        if v not in NLL_VARIANTS:
            raise ValueError(f"unknown variant {v!r}; known: {NLL_VARIANTS}")
        params = untrained_gist_params if v == "gistnet_untrained" else gist_params
        kind = "gistnet" if v == "gistnet_untrained" else v
        out[v] = np.asarray(variant_nll(frozen.params, params, tokens, base_cfg=cfg.base_config,
                                        gist_cfg=cfg.gist, layout=layout, variant=kind))
    return out


def available_variants(cfg) -> tuple[tuple[str, ...], dict[str, str]]:
    """The variants this base model / GistNet config can run, and why others cannot
    (mean_pool_hidden needs `gist.input_layer` <= the base model's layers)."""
    skipped = {}
    if cfg.gist.input_layer > cfg.base_config.num_layers:
        skipped["mean_pool_hidden"] = (
            f"skipped: gist.input_layer={cfg.gist.input_layer} exceeds the base model's "
            f"{cfg.base_config.num_layers} layers")
    return tuple(v for v in NLL_VARIANTS if v not in skipped), skipped


@dataclasses.dataclass
class PerWindowNLL:
    """Per-window NLLs of every (layout, variant) on the same held-out windows.

    `nll[layout][variant]` [N] is the mean NLL over a window's H targets; `tokens_nll` the
    same per target [N, H]. Window i is row i of the windows scored (`window_ids` may name
    where each came from)."""

    layouts: list[LayoutSpec]
    variants: tuple[str, ...]
    nll: dict[str, dict[str, np.ndarray]]
    tokens_nll: dict[str, dict[str, np.ndarray]]
    window_len: int
    window_ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_windows(self) -> int:
        first = next(iter(self.nll.values()))
        return int(next(iter(first.values())).shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an .npz: "nll/<layout>/<variant>" [N], "nll_tokens/..." [N, H],
        "window/<field>" [N]."""
        out = {}
        for lay, per in self.nll.items():
            for v, a in per.items():
                out[f"nll/{lay}/{v}"] = a
                out[f"nll_tokens/{lay}/{v}"] = self.tokens_nll[lay][v]
        for k, a in self.window_ids.items():
            out[f"window/{k}"] = np.asarray(a)
        return out


def per_window_nll(frozen: Frozen, gist_params, untrained_gist_params, windows: np.ndarray,
                   layouts: Sequence[LayoutSpec], *, batch_size: int,
                   variants: Sequence[str] | None = None, progress: bool = False,
                   window_ids: dict[str, np.ndarray] | None = None) -> PerWindowNLL:
    """NLL of every variant at every layout on windows [N, S], `batch_size` windows per
    forward (the last batch padded with copies, dropped after: one compiled shape).

    The full-context NLL depends only on (prefix, horizon) and truncation only on the
    sink and raw tail, so each is computed once per window and shared by the layouts that
    agree."""
    from tqdm.auto import tqdm

    from mcjax.eval.tasks import batches_of

    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"windows must be a non-empty [N, S] array, got shape {windows.shape}")
    if variants is None:
        variants, skipped = available_variants(frozen.cfg)
    else:
        skipped = {}
    variants = tuple(variants)
    for must in ("full", "truncation"):
        if must not in variants:
            raise ValueError(f"variants must include {must!r} (ΔNLL and the paired reference)")
    batches = batches_of(windows, batch_size)
    shared: dict[tuple, np.ndarray] = {}
    nll: dict[str, dict[str, np.ndarray]] = {}
    tok: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(total=len(layouts) * len(batches), desc="ΔNLL@H layouts x batches",
               disable=not progress)
    for spec in layouts:
        lay = spec.layout
        keys = {"full": ("full", lay.prefix_len, lay.horizon),
                "truncation": ("truncation", lay.prefix_len, lay.horizon, lay.raw_start,
                               lay.sink_len, lay.position_scheme)}
        todo = [v for v in variants if not (v in keys and keys[v] in shared)]
        got: dict[str, list[np.ndarray]] = {v: [] for v in todo}
        for batch, real in batches:
            out = window_variant_nll(frozen, gist_params, untrained_gist_params, batch, lay,
                                     todo)
            for v in todo:
                got[v].append(out[v][:real])
            bar.update(1)
        per_tok = {v: np.concatenate(got[v]).astype(np.float32) for v in todo}
        for v, k in keys.items():
            if v in per_tok:
                shared[k] = per_tok[v]
            per_tok[v] = shared[k]
        tok[spec.name] = {v: per_tok[v] for v in variants}
        nll[spec.name] = {v: per_tok[v].mean(axis=1) for v in variants}
    bar.close()
    return PerWindowNLL(layouts=list(layouts), variants=variants, nll=nll, tokens_nll=tok,
                        window_len=int(windows.shape[1]), window_ids=dict(window_ids or {}),
                        skipped=skipped)


def summarize_delta_nll(pw: PerWindowNLL) -> dict[str, Any]:
    """The "delta_nll" section: per layout, mean NLL and ΔNLL@H (± SE) of every variant."""
    rows = []
    for spec in pw.layouts:
        nll = pw.nll[spec.name]
        rows.append({**spec.describe(),
                     "nll": {v: float(nll[v].mean()) for v in pw.variants},
                     "delta_nll": {v: mean_stderr(nll[v] - nll["full"])
                                   for v in pw.variants}})
    return {"windows": pw.num_windows, "window_len": pw.window_len,
            "variants": list(pw.variants), "skipped_variants": dict(pw.skipped),
            "targets": TARGETS_NOTE, "layouts": rows}


def paired_rows(pw: PerWindowNLL, variants: Sequence[str] = PAIRED_VARIANTS) -> list[dict]:
    """The "dnll_paired" rows: every (layout, variant) against truncation on the same
    windows (`metrics.paired_vs_truncation`), with the layout's shape."""
    rows = []
    for spec in pw.layouts:
        nll = pw.nll[spec.name]
        for v in variants:
            if v not in nll:
                continue
            stats = metrics.paired_vs_truncation(nll[v], nll["truncation"], nll["full"])
            rows.append({"layout": spec.name, "variant": v, **stats,
                         "keep_raw_blocks": spec.layout.keep_raw_blocks,
                         "num_gists": spec.layout.num_gists,
                         "context_ratio": spec.context_ratio})
    return rows


def delta_nll_sweep(frozen: Frozen, gist_params, untrained_gist_params,
                    batches: Sequence[np.ndarray], layouts: Sequence[LayoutSpec], *,
                    progress: bool = False) -> dict[str, Any]:
    """ΔNLL@H of every variant at every layout on the same held-out windows (batches of
    windows; see `per_window_nll`), with the paired statistics under "paired"."""
    if not batches:
        raise ValueError("delta_nll_sweep needs at least one batch of windows")
    pw = per_window_nll(frozen, gist_params, untrained_gist_params, np.concatenate(batches),
                        layouts, batch_size=int(batches[0].shape[0]), progress=progress)
    return {**summarize_delta_nll(pw), "paired": paired_rows(pw)}


# --------------------------------------------------------------------------- passkey


@dataclasses.dataclass
class PasskeyRun:
    """Greedy continuations of one method on a batch of passkey cases."""

    tokens: list[list[int]]  # per case, up to (excluding) EOS
    texts: list[str]
    scores: list[metrics.PasskeyScore]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    focus_snapshots: list[dict] | None = None  # stream 0's WC after each refocus

    def summary(self) -> dict[str, Any]:
        return {**metrics.accuracy(self.scores), **self.info}


def trim_at_eos(tokens, eos_id: int | None) -> list[int]:
    out = []
    for t in np.asarray(tokens).ravel().tolist():
        if eos_id is not None and t == eos_id:
            break
        out.append(int(t))
    return out


def score_outputs(outputs, cases, decode, eos_id) -> tuple[list, list, list]:
    toks = [trim_at_eos(o, eos_id) for o in outputs]
    texts = [decode(t) for t in toks]
    return toks, texts, [metrics.score_passkey(t, c.key) for t, c in zip(texts, cases)]


def megacontext_passkey(base, gist_params, lens_params, cfg: ExperimentConfig,
                        cases: Sequence[data.RetrievalExample], *, policy: str,
                        max_new_tokens: int, decode: Callable, eos_id: int | None,
                        refocus_steps: int, max_tokens: int, focus_seed: int = 0,
                        record_focus: bool = False, progress: bool = False,
                        at_answer: Callable[[Session], None] | None = None) -> PasskeyRun:
    """Feed every case (one session stream each) with `feed_schedule` — the bulk at once,
    then the last blocks one refocus at a time — and generate greedily. `policy` picks the
    refocus scores: "lens", "random" or "recency" (`Session(focus_policy=...)`).
    With `record_focus`, stream 0's focus (the LOD of every span) is recorded after each
    refocus up to the answer (not after it: that would cost one more refocus of every
    stream, ~7 min for 24 streams of 16k tokens on 2 cores, for one picture). `progress`
    shows a bar over the feeds (the bulk read of every case's history is the long one)
    and the answer. `at_answer(session)` is called once the history is fed and focus has
    settled, just before the answer is generated (diagnostics: the WC the reader answers
    from)."""
    from tqdm.auto import tqdm

    lengths = {len(c.tokens) for c in cases}
    if len(lengths) != 1:
        raise ValueError(f"cases of one run must have one length, got {sorted(lengths)}")
    length = lengths.pop()
    session = Session(base, gist_params, lens_params, cfg, batch_size=len(cases),
                      max_tokens=max_tokens, focus_policy=policy, focus_seed=focus_seed)
    snapshots: list[dict] | None = [] if record_focus else None

    def snap(stage: str):
        if snapshots is not None:
            snapshots.append({"stage": stage, "num_tokens": int(session.num_tokens[0]),
                              "runs": [list(r) for r in session.focus_runs(0)]})

    schedule = feed_schedule(length, cfg.mc.block_size, refocus_steps)
    bar = tqdm(total=len(schedule) + 1, leave=False, disable=not progress, unit="step",
               desc=f"{policy}: {len(cases)} cases x {length:,} tokens, feeds + answer")
    # the bulk is fed in pieces of whole read chunks (the same tree as one feed, bit for
    # bit: complete chunks are read whole either way) so the bar moves during the long read
    R = session.read_pass["chunk"] or cfg.mc.block_size
    piece = max(1, 8192 // R) * R
    for start, stop in schedule:
        bar.set_postfix(tokens=f"{start:,}-{stop:,}")
        for a in range(start, stop, piece if start == 0 else stop - start):
            session.feed([c.tokens[a:min(stop, a + piece)] for c in cases])
            if start == 0:
                bar.set_postfix(tokens=f"{min(stop, a + piece):,}/{stop:,} read")
        session.sync()
        snap("feed" if start == 0 else "refocus")
        bar.update(1)
    # focus recall: the answer's tokens raw in each stream's WC when the answer starts
    recall = [metrics.focus_recall(session.focus_runs(b), answer_positions(c, decode))
              for b, c in enumerate(cases)]
    if at_answer is not None:
        at_answer(session)
    bar.set_postfix(tokens="answer")
    out = session.generate(max_new_tokens, eos_id=eos_id)
    bar.update(1)
    bar.close()
    toks, texts, scores = score_outputs(out, cases, decode, eos_id)
    events = list(session.events)  # the refocuses up to the answer
    info = {"focus_recall": int(sum(recall)), "answer_raw": recall,
            "refocuses": len(events),
            "focus_actions": int(sum(sum(e.num_expand) + sum(e.num_collapse) for e in events)),
            "budget_collapses": int(sum(sum(e.append_collapses) + sum(e.headroom_collapses)
                                        for e in events)),
            "untrained_nets": list(session.untrained)}
    return PasskeyRun(toks, texts, scores, info, snapshots)


def sliding_window_generate(llama: LlamaConfig, params, histories: Sequence[np.ndarray],
                            w_max: int, max_new_tokens: int, eos_id: int | None = None,
                            pad_id: int = 0) -> np.ndarray:
    """Plain base-model greedy generation from the last `w_max` tokens of each history
    (positions 0.. of that window): tokens [B, max_new_tokens], pad after EOS."""
    windows = [np.asarray(h)[-w_max:] for h in histories]
    T = max(len(w) for w in windows)
    prompt = np.full((len(windows), T), pad_id, np.int32)
    for b, w in enumerate(windows):
        prompt[b, : len(w)] = w
    sampler = GreedySampler(llama, max_new_tokens=max_new_tokens, max_prompt_len=T,
                            eos_id=eos_id, pad_id=pad_id)
    out, _ = sampler.generate(params, prompt, np.asarray([len(w) for w in windows]))
    return out


FULL_CONTEXT_PREFILL_CHUNK = 1024  # full-context prompts are prefilled this many slots at a time


def full_context_fit(llama: LlamaConfig, length: int, max_new_tokens: int, num_cases: int,
                     memory_limit_bytes: float) -> tuple[int, str | None]:
    """(streams per batch, None) when plain full-context generation over `length` tokens
    fits, else (0, why not): past the model's trained positions, or even one stream over
    the memory limit. The prompt is prefilled in chunks of `FULL_CONTEXT_PREFILL_CHUNK`
    slots (`GreedySampler.prefill_chunk`), so a stream's peak is one chunk's fp32
    attention scores and probabilities of every head against the whole cache, the bias,
    and the fp32 KV cache."""
    total = length + max_new_tokens
    if total > llama.max_position_embeddings:
        return 0, (f"does not fit: {length} + {max_new_tokens} tokens exceed the model's "
                   f"{llama.max_position_embeddings} trained positions")
    C = min(FULL_CONTEXT_PREFILL_CHUNK, length)
    slots = -(-length // C) * C + max_new_tokens
    per_stream = (4.0 * C * slots * (2 * llama.num_heads + 1)
                  + 2 * 4.0 * llama.num_layers * slots * llama.num_kv_heads * llama.head_dim)
    batch = int(memory_limit_bytes // per_stream)
    if batch < 1:
        return 0, (f"does not fit: one stream's prefill needs ~{per_stream / 2**30:.1f} GiB, "
                   f"over the memory limit of {memory_limit_bytes / 2**30:.1f} GiB")
    return min(batch, num_cases), None


def full_context_generate(llama: LlamaConfig, params, histories: Sequence[np.ndarray],
                          max_new_tokens: int, eos_id: int | None, batch: int) -> np.ndarray:
    """Plain base-model greedy generation over each whole history, `batch` streams at a
    time (one compilation per history length; the prompt prefilled in chunks of
    `FULL_CONTEXT_PREFILL_CHUNK`)."""
    T = len(histories[0])
    sampler = GreedySampler(llama, max_new_tokens=max_new_tokens, max_prompt_len=T,
                            eos_id=eos_id, prefill_chunk=min(FULL_CONTEXT_PREFILL_CHUNK, T))
    outs = []
    for i in range(0, len(histories), batch):
        chunk = np.stack([np.asarray(h) for h in histories[i: i + batch]])
        if len(chunk) < batch:  # keep one compiled shape: pad with copies, drop them after
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        out, _ = sampler.generate(params, chunk)
        outs.append(out[: min(batch, len(histories) - i)])
    return np.concatenate(outs)


# --------------------------------------------------------------------------- focus quality

FOCUS_SCORERS = ("lens", "retrieval", "recency", "random")


@functools.partial(jax.jit, static_argnames=("base_cfg", "gist_cfg", "task"))
def _counterfactuals(gist_params, base_params, tokens, rng, *, base_cfg, gist_cfg, task):
    return counterfactuals.gistnet_counterfactuals(gist_params, gist_cfg, base_params, base_cfg, tokens,
                                                   rng, task)


@functools.partial(jax.jit, static_argnames=("lens_cfg", "task", "scorer"))
def _candidate_predictions(lens_params, cf, key, *, lens_cfg, task, scorer):
    mc = task.mc
    if scorer == "lens":
        scores = lens_lib.LensNet(lens_cfg, mc).apply({"params": lens_params}, cf.slot_embeds,
                                                      cf.wc, cf.tail, *cf.lens_inputs())
    elif scorer == "retrieval":
        scores = jax.vmap(lambda wc, b: retrieval.slot_scores(wc, b, mc))(
            cf.wc, cf.retrieval_blocks)
    elif scorer == "recency":
        scores = recency_scores(cf.wc, mc)
    else:
        keys = jax.random.split(key, cf.wc.level.shape[0])
        scores = jax.vmap(lambda k, wc: random_scores(k, wc, mc))(keys, cf.wc)
    return jax.vmap(lambda s, c: counterfactuals.candidate_scores(s, c, mc.block_size))(
        scores, cf.candidates)


def focus_quality(frozen: Frozen, gist_params, lens_params, batches: Sequence[np.ndarray],
                  task: counterfactuals.LensTask, *, seed: int = 0,
                  scorers: Sequence[str] | None = None, progress: bool = False
                  ) -> dict[str, Any]:
    """Scores against measured counterfactual utility on held-out windows.

    Per window: a compressed WC of the prefix and candidate expansions / collapses
    (`counterfactuals.counterfactuals`, the lens trainer's task), each candidate's *value of detail*
    measured by one counterfactual forward (nats/token: NLL an expansion saves, NLL a
    collapse costs), and what the allocator would read for it (the slot's score for an
    expansion, the group's mean score for a collapse) under each scorer. A good scorer
    ranks candidates by value: Pearson / Spearman of (score, value); sign agreement of the
    score with the normalised utility (value relative to the window's mean value, the
    zero-sum budget price, as the lens is trained), over the pairs where both are nonzero.
    `scorers`: default every one of FOCUS_SCORERS the task supports ("retrieval" needs its
    retrieval read; LensNet v2 too).
    """
    from tqdm.auto import tqdm

    cfg = frozen.cfg
    if scorers is None:
        scorers = [s for s in FOCUS_SCORERS if s != "retrieval" or task.retrieval is not None]
    unknown = [s for s in scorers if s not in FOCUS_SCORERS]
    if unknown:
        raise ValueError(f"unknown focus scorers {unknown}; known: {', '.join(FOCUS_SCORERS)}")
    if "retrieval" in scorers and task.retrieval is None:
        raise ValueError("the retrieval scorer needs a lens task with the retrieval read "
                         "(counterfactuals.lens_task(cfg, retrieval=True))")
    eps = counterfactuals.UTILITY_EPS
    pred: dict[str, list] = {s: [] for s in scorers}
    values, targets, kinds = [], [], []
    for i, batch in enumerate(tqdm(batches, desc="focus quality", disable=not progress)):
        if batch.shape[1] < task.window_len:
            raise ValueError(f"windows of {batch.shape[1]} tokens are shorter than the lens "
                             f"task's {task.window_len}")
        rng = jax.random.fold_in(jax.random.key(seed), i)
        cf = _counterfactuals(gist_params, frozen.params, jnp.asarray(batch), rng,
                              base_cfg=cfg.base_config, gist_cfg=cfg.gist, task=task)
        valid = np.asarray(cf.valid)
        values.append(np.asarray(cf.value)[valid])
        targets.append(np.asarray(counterfactuals.normalized_utility(cf.value, cf.valid, eps))[valid])
        kinds.append(np.asarray(cf.candidates.kind)[valid])
        for s in scorers:
            p = _candidate_predictions(lens_params, cf, jax.random.fold_in(rng, 7),
                                       lens_cfg=cfg.lens, task=task, scorer=s)
            pred[s].append(np.asarray(p)[valid])
    value = np.concatenate(values)
    target = np.concatenate(targets)
    kind = np.concatenate(kinds)
    out: dict[str, Any] = {
        "windows": int(sum(len(b) for b in batches)), "candidates": int(value.size),
        "expand_candidates": int((kind == counterfactuals.EXPAND_CANDIDATE).sum()),
        "collapse_candidates": int((kind == counterfactuals.COLLAPSE_CANDIDATE).sum()),
        "value_mean_abs": float(np.abs(value).mean()) if value.size else None,
        "definition": ("value = NLL change of the candidate action on the H continuation "
                       "tokens, signed so that higher means the span's detail is worth more "
                       "(expansion: NLL saved; collapse: NLL cost); normalised utility = "
                       "tanh((value - window mean) / (window std + 0.01))"),
        "scorers": {}}
    for s in scorers:
        p = np.concatenate(pred[s])
        row = {"vs_value": metrics.correlation_summary(p, value),
               "vs_normalised_utility": metrics.correlation_summary(p, target)}
        for name, k in (("expand", counterfactuals.EXPAND_CANDIDATE),
                        ("collapse", counterfactuals.COLLAPSE_CANDIDATE)):
            row[f"{name}_vs_value"] = metrics.correlation_summary(p[kind == k], value[kind == k])
        out["scorers"][s] = row
    return out
