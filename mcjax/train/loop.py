"""Training loops (big_vision style: one readable loop, `run_training`, shared by all) and
their evaluations.

`train_gist(cfg, workdir)` resumes from the latest checkpoint in `workdir` by default,
logs metrics as JSON lines to `workdir/metrics.jsonl`, evaluates held-out ΔNLL@H beside
the truncation and mean-pooling baselines, and checkpoints state + data position.
`train_lens` (LensNet on counterfactual utilities, GistNet frozen: trained from a gist
workdir or untrained) and `train_joint` (both nets, summed objectives) do the same.
Randomness per step is `fold_in(seed, step)` and the data position is checkpointed, so a
killed and resumed run ends with the same params as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import nets, sharding
from mcjax.checkpoint import Checkpointer
from mcjax.config import ConfigError, ExperimentConfig, config_to_json
from mcjax.train import data, losses, steps


@dataclasses.dataclass(frozen=True)
class Frozen:
    """The frozen base model as training sees it."""

    cfg: ExperimentConfig  # with base_config filled in
    params: Any
    encode: Callable[[str], np.ndarray]
    tokenizer_id: str
    separator: int


def byte_encode(vocab_size: int) -> Callable[[str], np.ndarray]:
    """Tokenizer for random tiny bases: UTF-8 bytes (the tiny vocab holds all 256)."""
    if vocab_size < 256:
        raise ValueError(f"byte tokens need vocab_size >= 256, got {vocab_size}")
    return lambda text: np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def load_frozen(cfg: ExperimentConfig) -> Frozen:
    """Build (random) or load the frozen base model named by `cfg.base`."""
    from mcjax.base.model import init_params

    if cfg.base == "random":
        params = init_params(cfg.base_config, jax.random.key(cfg.train.seed + 10_007))
        return Frozen(cfg, params, byte_encode(cfg.base_config.vocab_size), "bytes",
                      cfg.base_config.eos_token_id or 0)
    from mcjax.base.loading import load_base_model

    model = load_base_model(cfg.base)
    cfg = dataclasses.replace(cfg, base_config=model.config)
    return Frozen(cfg, model.params, model.encode, cfg.base, model.config.eos_token_id or 0)


def window_prefix_len(cfg: ExperimentConfig) -> int:
    """Tokens of a training window before its H continuation tokens (a multiple of K)."""
    H = cfg.mc.horizon
    prefix = cfg.train.seq_len - H
    if prefix <= 0 or prefix % cfg.mc.block_size:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) minus mc.horizon ({H}) must be "
                         f"a positive multiple of block_size ({cfg.mc.block_size})")
    return prefix


def gist_layout(cfg: ExperimentConfig, use_lod2: bool = True, keep_raw_blocks: int = 1
                ) -> losses.GistLayout:
    return losses.GistLayout.build(cfg.mc, window_prefix_len(cfg), use_lod2=use_lod2,
                                   keep_raw_blocks=keep_raw_blocks)


def gist_train_layouts(cfg: ExperimentConfig) -> dict[str, losses.GistLayout]:
    """The layouts GistNet steps cycle over (`train.gist_keep_raw`, `train.gist_lod2`),
    named as in the evaluation (`lod1_keep4`, `lod1+lod2_keep1`); duplicates dropped."""
    out: dict[str, losses.GistLayout] = {}
    keep = cfg.train.gist_keep_raw
    if not keep:
        raise ValueError("train.gist_keep_raw must name at least one keep-raw block count")
    for k in keep:
        out.setdefault(f"lod1_keep{k}", gist_layout(cfg, use_lod2=False, keep_raw_blocks=k))
    if cfg.train.gist_lod2:
        lay = gist_layout(cfg, use_lod2=True, keep_raw_blocks=keep[0])
        if lay.lod2_groups and lay not in out.values():
            out[f"lod1+lod2_keep{keep[0]}"] = lay
    return out


def held_out_batches(frozen: Frozen, num: int, batch_size: int, seq_len: int,
                     seed: int = 1234) -> list[np.ndarray]:
    """`num` batches of held-out windows, each lying inside one document."""
    corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                   separator=frozen.separator, progress=False)
    windows = data.document_windows(corpus, seq_len, num * batch_size, seed=seed)
    return [windows[i * batch_size: (i + 1) * batch_size] for i in range(num)]


VARIANTS = ("gistnet", "mean_pool", "mean_pool_hidden", "truncation")


@functools.partial(jax.jit, static_argnames=("base_cfg", "gist_cfg", "layout", "variant"))
def variant_nll(base_params, gist_params, tokens, *, base_cfg, gist_cfg, layout, variant):
    """NLL [B, H] of the continuation under one context variant (same targets for all).

    gistnet: GistNet on its configured children; mean_pool: the mean of the token
    embeddings; mean_pool_hidden: the mean of the read-pass hidden states after
    `gist_cfg.input_layer` layers, rescaled to the embeddings' RMS; truncation: the
    gisted span dropped (the sink stays)."""
    if variant == "full":
        return losses.full_context_nll(base_params, base_cfg, tokens, layout)[0]
    if variant == "truncation":
        fn, children = None, None
    elif variant in VARIANTS:
        fn, children = losses.gist_inputs(variant, base_params, base_cfg, gist_params, gist_cfg,
                                          tokens[:, : layout.raw_start])
    else:
        raise ValueError(f"unknown variant {variant!r}; known: full, {', '.join(VARIANTS)}")
    return losses.substitution_nll(base_params, base_cfg, tokens, layout, fn,
                                   children=children)[0]


def evaluate_substitution(gist_params, frozen: Frozen, batches: list[np.ndarray],
                          layouts: dict[str, losses.GistLayout]) -> dict[str, Any]:
    """Held-out ΔNLL@H of GistNet gists vs truncation and mean pooling, per layout, with
    the paired difference of GistNet to truncation (± SE over windows).

    Every variant of a window is scored on the identical continuation targets.
    """
    from mcjax.eval.metrics import mean_stderr

    cfg = frozen.cfg
    out: dict[str, Any] = {}
    for name, layout in layouts.items():
        per = {k: [] for k in ("full", *VARIANTS)}
        for batch in batches:
            tokens = jnp.asarray(batch)
            for variant in per:
                nll = variant_nll(frozen.params, gist_params, tokens, base_cfg=cfg.base_config,
                                  gist_cfg=cfg.gist, layout=layout, variant=variant)
                per[variant].append(np.asarray(nll).mean(axis=1))
        nll = {k: np.concatenate(v) for k, v in per.items()}
        diff = mean_stderr(nll["gistnet"] - nll["truncation"])
        out[name] = {
            "compression_ratio": layout.compression_ratio,
            "compressed_tokens": layout.compressed_tokens,
            "gists": layout.num_gists,
            "windows": int(nll["full"].shape[0]),
            "nll_full": float(nll["full"].mean()),
            **{f"delta_nll_{k}": float((nll[k] - nll["full"]).mean()) for k in VARIANTS},
            "gistnet_minus_truncation": diff["mean"],
            "gistnet_minus_truncation_se": diff["stderr"],
        }
    return out


class MetricsLog:
    """Metrics as append-only JSON lines (`path`, one object per line, `step` in each) and
    as TensorBoard scalars (event files under `tensorboard_dir`, tags `kind/name`, nested
    dicts joined with "/"; non-numeric values go to the JSONL only). Only process 0
    writes, so a multi-host run logs once."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self._writer = None
        self.enabled = jax.process_index() == 0
        if self.enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind, "time": time.time(),
               **{k: _to_py(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard_dir is not None:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.tensorboard_dir))
            for tag, value in _scalars(kind, row).items():
                self._writer.add_scalar(tag, value, int(step), walltime=row["time"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _scalars(prefix: str, values: dict) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if k in ("step", "kind", "time"):
            continue
        if isinstance(v, dict):
            out.update(_scalars(f"{prefix}/{k}", v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = float(v)
    return out


def _to_py(v):
    if isinstance(v, dict):
        return {k: _to_py(x) for k, x in v.items()}
    if hasattr(v, "item"):
        return v.item()
    return v


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when multi-host environment variables are set."""
    keys = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
    if any(os.environ.get(k) for k in keys) and int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


@dataclasses.dataclass(frozen=True)
class Job:
    """What one kind of training run adds to the shared loop (`run_training`)."""

    name: str  # progress-bar label and `run` in checkpoint metadata
    step: Any  # steps.GistStep | steps.LensStep | steps.JointStep
    optimizer: Any
    params: dict  # initial trainable params
    frozen_inputs: Any  # the step's frozen argument (unplaced)
    # (trainable params, sharded step, placed frozen inputs, held-out batches) -> metrics
    evaluate: Callable[[Any, steps.ShardedStep, Any, list], dict] | None
    postfix: Callable[[dict], dict]  # train metrics -> progress-bar fields
    meta: dict | None = None  # saved with every checkpoint; a resume must match it
    notes: dict | None = None  # written to the log (and stderr) when the run starts


# What a run-settings key means in checkpoints saved before the key was recorded.
_RESUME_DEFAULTS = {"ema_decay": 0.0}


def _check_resume(saved: dict, expected: dict | None, where: Path) -> None:
    for key, want in (expected or {}).items():
        have = saved.get(key, _RESUME_DEFAULTS.get(key))
        if have != want:
            raise ValueError(
                f"cannot resume {where}: its checkpoints were made with {key}={have!r} but this "
                f"run uses {key}={want!r}; pass the original settings or start afresh "
                f"(--no-resume / resume=False) in another workdir")


def check_resumable(workdir: Path, expected: dict | None, resume: bool) -> None:
    """Fail fast (before loading models) when `workdir` holds checkpoints made with other
    run settings than `expected` (e.g. another GistNet); `run_training` checks again."""
    if not resume or not expected or not (workdir / "checkpoints").is_dir():
        return
    ckpt = Checkpointer(workdir, create=False)
    try:
        if ckpt.latest_step() is not None:
            _check_resume(ckpt.read_meta().get("extra") or {}, expected, workdir)
    finally:
        ckpt.close()


def resumed_train_changes(saved_cfg_json: dict, cfg: ExperimentConfig) -> dict[str, dict]:
    """{train.key: {"was", "now"}} for every train setting of `cfg` that differs from the
    checkpoint's (`saved_cfg_json`): a resume may change them (a longer cosine, a lower
    rate), and the run's log then records it."""
    saved = saved_cfg_json.get("train") or {}
    now = config_to_json(cfg)["train"]  # JSON-normalised (tuples as lists), as saved
    return {f"train.{k}": {"was": saved.get(k), "now": v} for k, v in now.items()
            if k in saved and saved[k] != v}


def run_training(cfg: ExperimentConfig, frozen: Frozen, workdir: Path, job: Job, *,
                 resume: bool, progress: bool, eval_batches: int, stop_after: int | None
                 ) -> dict[str, Any]:
    """The loop every trainer shares: sharded jitted step, resumable data, checkpoints with
    the data position, metrics.jsonl, held-out evaluation before / during / after."""
    from tqdm.auto import tqdm

    tc = cfg.train
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {tc.ema_decay}")
    use_ema = tc.ema_decay > 0
    # the EMA changes the checkpointed state's structure: a resume must agree on it
    run_meta = {**(job.meta or {}), "ema_decay": tc.ema_decay}
    mesh = sharding.make_mesh(cfg.mesh)
    state = steps.init_state(job.params, job.optimizer, ema=use_ema)
    sharded = steps.jit_step(job.step, job.optimizer, mesh, state, job.frozen_inputs,
                             tc.batch_size, ema_decay=tc.ema_decay)
    corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "train",
                                   separator=frozen.separator, progress=progress)
    batches = data.WindowIterator(corpus.tokens, tc.batch_size, tc.seq_len, seed=tc.seed)
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    log = MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard")
    eval_set = (held_out_batches(frozen, eval_batches, tc.batch_size, tc.seq_len)
                if eval_batches and job.evaluate is not None else [])

    start = 0
    if resume and ckpt.latest_step() is not None:
        # the newest checkpoint that restores intact; damaged newer ones are skipped, and
        # said so (a run killed mid-save, a disk error)
        state, meta, step, skipped = ckpt.restore_intact(
            state, cfg, lambda meta: _check_resume(meta.get("extra") or {}, run_meta,
                                                   workdir))
        if skipped:
            log.write(step, "info", {"resumed_past_damaged_checkpoints": [
                {"step": s, "why": why} for s, why in skipped]})
            print(f"{job.name}: resuming from step {step}, the newest intact checkpoint; "
                  f"skipped damaged " + "; ".join(f"step {s} ({why})" for s, why in skipped),
                  file=sys.stderr)
        batches.restore(meta["data_position"])
        start = int(state.step)
        changed = resumed_train_changes(meta["config"], cfg)
        if changed:  # allowed (e.g. a longer cosine), but never silent
            log.write(start, "info", {"resumed_with_changed_train_settings": changed})
            print(f"{job.name}: resuming step {start} with changed train settings (the "
                  f"schedule may jump): " + ", ".join(
                      f"{k} {v['was']!r} -> {v['now']!r}" for k, v in changed.items()),
                  file=sys.stderr)
    frozen_placed = sharded.place_base(job.frozen_inputs)
    state = sharded.place_state(state)
    if job.notes:
        log.write(start, "info", job.notes)
        for k, v in job.notes.items():
            print(f"{job.name}: {k}: {v}", file=sys.stderr)

    def evaluate(params):
        return job.evaluate(params, sharded, frozen_placed, eval_set)

    def evaluate_and_log(step, state) -> dict:
        """Held-out metrics of the params (kind "eval") and of their EMA ("eval_ema")."""
        out = evaluate(state.params)
        log.write(step, "eval", out)
        if use_ema and step > 0:
            log.write(step, "eval_ema", evaluate(state.ema_params))
        return out

    result: dict[str, Any] = {"start_step": start}
    if start == 0 and eval_set:
        result["eval_before"] = evaluate_and_log(0, state)

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    tokens_per_step = tc.batch_size * tc.seq_len
    bar = tqdm(range(start, end), initial=start, total=tc.steps, desc=job.name,
               disable=not progress)
    t_last, logged_at, metrics, pending = time.perf_counter(), start, {}, []
    for step in bar:
        batch = sharded.place_batch(next(batches))
        rng = sharded.place_rng(jax.random.fold_in(jax.random.key(tc.seed), step))
        state, metrics = sharded.train(state, frozen_placed, batch, rng)
        pending.append(metrics)
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            now = time.perf_counter()
            # the first interval includes compilation; later ones are steady-state
            rate = tokens_per_step * (done - logged_at) / max(now - t_last, 1e-9)
            t_last, logged_at = now, done
            # One row per layout seen since the last log (steps may cycle over layouts:
            # logging only every log_every-th step would show a single one of them).
            for metrics in _mean_by_layout(jax.device_get(pending)):
                metrics["tokens_per_s"] = rate
                log.write(done, "train", metrics)
            pending = []
            bar.set_postfix(**job.postfix(metrics))
        if eval_set and done % tc.eval_every == 0 and done != end:
            evaluate_and_log(done, state)
        if done % tc.checkpoint_every == 0 or done == end:
            ckpt.save(done, state, batches.state(), cfg, run_meta)
    ckpt.wait()
    ckpt.close()
    if end == tc.steps and eval_set:
        result["eval_after"] = evaluate_and_log(end, state)
    log.close()
    result.update(end_step=end, last_train_metrics=_to_py(jax.device_get(metrics)),
                  workdir=str(workdir))
    result["state"] = state
    return result


def _mean_by_layout(rows: list[dict]) -> list[dict]:
    """Per-step metric dicts -> one dict per `layout` index (means, with `steps`)."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(int(np.asarray(r.get("layout", 0))), []).append(r)
    out = []
    for lay in sorted(groups):
        g = groups[lay]
        m = {k: np.mean([np.asarray(r[k], np.float64) for r in g], axis=0) for k in g[0]}
        m["layout"], m["steps"] = lay, len(g)
        out.append(m)
    return out


def _start(cfg: ExperimentConfig, part: str, frozen: Frozen, params_file, flag: str,
           notes: dict):
    """The params a run starts `part` from: the random init (`nets.init_params`), or the
    params-only file `params_file` (a warm start; recorded in `notes`)."""
    if params_file is None:
        return nets.init_params(cfg, part, frozen.params)
    notes[flag.lstrip("-").replace("-", "_")] = str(params_file)
    return nets.load_params_file(params_file, cfg, part, f"{flag} {params_file}",
                                 card_required=False)[0]


def train_gist(cfg: ExperimentConfig, workdir: str | os.PathLike, *, resume: bool = True,
               progress: bool = True, eval_batches: int = 4, stop_after: int | None = None,
               init_gist: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train GistNet on substitutability; returns the final metrics and evaluations.

    Steps cycle over `gist_train_layouts(cfg)` (`train.gist_keep_raw`, `train.gist_lod2`);
    `train.gist_dense` scores every raw-tail position. Held-out evaluation covers every
    training layout.

    `stop_after` ends the process's work after that many steps of this call (the run can be
    resumed later), which tests use to emulate interruptions deterministically.

    `init_gist`: a params-only GistNet file (e.g. the shipped one) to start from instead of
    the random init (a warm start: fresh optimizer state and schedule). A checkpoint in
    `workdir` still takes precedence when resuming.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    tc = cfg.train
    layouts = gist_train_layouts(cfg)
    notes = {"layouts": list(layouts)}
    gist_params = _start(cfg, "gist", frozen, init_gist, "--init-gist", notes)
    job = Job(
        name="train_gist",
        step=steps.GistStep(cfg, tuple(layouts.values()), nll_weight=tc.gist_nll_weight,
                            kl_weight=tc.gist_kl_weight, dense=tc.gist_dense),
        optimizer=steps.make_optimizer(cfg.train), params={"gist": gist_params},
        frozen_inputs=frozen.params,
        evaluate=lambda params, sh, fz, batches: evaluate_substitution(
            params["gist"], frozen, batches, layouts),
        postfix=lambda m: {"loss": f"{float(m['loss']):.4f}",
                           "dnll": f"{float(m['delta_nll']):+.4f}"},
        notes=notes)
    return run_training(cfg, frozen, workdir, job, resume=resume, progress=progress,
                        eval_batches=eval_batches, stop_after=stop_after)


# --------------------------------------------------------------------------- LensNet


def lens_task(cfg: ExperimentConfig, candidates: int = 4, *,
              retrieval: bool | None = None) -> losses.LensTask:
    """The counterfactual task of a config: the WC covers the window's prefix
    (seq_len − H tokens), scored on the H continuation tokens. `retrieval` (default: when
    LensNet is v2, which needs it) adds the query-aware read — the question's hidden
    states and the blocks' retrieval scores, as the runtime's refocus computes them."""
    if retrieval is None:
        retrieval = cfg.lens.conditioned
    # LensTask.build refuses a v2 LensNet without the retrieval read
    return losses.LensTask.build(cfg.mc, window_prefix_len(cfg), candidates=candidates,
                                 layout_seed=cfg.train.seed,
                                 retrieval=cfg.retrieval if retrieval else None,
                                 lens=cfg.lens)


def _task_meta(task: losses.LensTask) -> dict:
    return {"prefix_len": task.prefix_len, "horizon": task.horizon,
            "num_expand": task.num_expand, "num_collapse": task.num_collapse,
            "num_layouts": task.num_layouts, "max_random_edits": task.max_random_edits,
            "layout_seed": task.layout_seed}


def evaluate_lens(sharded: steps.ShardedStep, params, frozen_placed, batches: list[np.ndarray],
                  prefix: str = "") -> dict[str, float]:
    """Held-out lens metrics (the step's `evaluate`, fixed candidate key), averaged over
    batches; `prefix` selects and strips a metric prefix (e.g. "lens/")."""
    sums: dict[str, float] = {}
    for batch in batches:
        metrics = jax.device_get(sharded.evaluate(params, frozen_placed,
                                                  sharded.place_batch(batch)))
        for k, v in metrics.items():
            if k.startswith(prefix):
                sums[k[len(prefix):]] = sums.get(k[len(prefix):], 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}


def train_lens(cfg: ExperimentConfig, workdir: str | os.PathLike, *,
               gist_workdir: str | os.PathLike | None = None,
               gist_params: str | os.PathLike | None = None,
               init_lens: str | os.PathLike | None = None, resume: bool = True,
               progress: bool = True, eval_batches: int = 4, stop_after: int | None = None,
               candidates: int = 4) -> dict[str, Any]:
    """Train LensNet on counterfactual focus utilities with the base model and GistNet
    frozen (GistNet from `gist_workdir`'s latest checkpoint or the params-only file
    `gist_params`, e.g. the shipped one; else untrained — logged). LensNet v2 configs get
    the query-aware conditioning the runtime gives them (`lens_task`).

    `init_lens`: a params-only LensNet file (e.g. the shipped, distilled v2) to fine-tune
    instead of the random init (fresh optimizer and schedule; a checkpoint in `workdir`
    still takes precedence when resuming).

    Held-out evaluation: the lens loss and its terms, pair accuracy and score/utility
    correlations on a fixed set of candidates, and ΔNLL@H of the compressed WCs.
    """
    if gist_workdir is not None and gist_params is not None:
        raise ValueError("give a GistNet workdir or a GistNet params file, not both")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task = lens_task(cfg, candidates)
    source = nets.source_identity(cfg, workdir=gist_workdir, params_file=gist_params)
    meta = {"run": "train_lens", "gistnet": source, "lens_task": _task_meta(task)}
    check_resumable(workdir, meta, resume)
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    gist = nets.load_identified(source, cfg, "gist", frozen.params,
                                what=f"--gist-params {gist_params}")
    step = steps.LensStep(cfg, task)
    if source["source"] == "untrained":
        note = (f"untrained GistNet (random init, seed {cfg.train.seed}): no gist workdir was "
                f"given; pass --gist-workdir to use trained gists")
    else:
        note = f"GistNet from {source['path']} (step {source['step']})"
    notes = {"gistnet": note}
    lens = _start(cfg, "lens", frozen, init_lens, "--init-lens", notes)
    job = Job(
        name="train_lens", step=step, optimizer=steps.make_optimizer(cfg.train),
        params={"lens": lens},
        frozen_inputs=step.frozen_inputs(frozen.params, gist),
        evaluate=lambda params, sh, fz, batches: {"lens": evaluate_lens(sh, params, fz,
                                                                        batches)},
        postfix=lambda m: {"loss": f"{float(m['loss']):.4f}",
                           "corr": f"{float(m['score_target_corr']):+.3f}"},
        meta=meta, notes=notes)
    result = run_training(cfg, frozen, workdir, job, resume=resume, progress=progress,
                          eval_batches=eval_batches, stop_after=stop_after)
    result["gistnet"] = source
    return result


def train_joint(cfg: ExperimentConfig, workdir: str | os.PathLike, *, resume: bool = True,
                progress: bool = True, eval_batches: int = 4, stop_after: int | None = None,
                candidates: int = 4, lens_weight: float = 1.0,
                init_gist: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train GistNet and LensNet together on the same batches (summed objectives, see
    `steps.JointStep`). The GistNet term is `train_gist`'s: steps cycle over
    `gist_train_layouts(cfg)` with its weights and `train.gist_dense`; `init_gist` warm
    starts GistNet as there. Held-out evaluation: substitution ΔNLL@H beside the baselines
    on every training layout (as `train_gist`) and the lens metrics (as `train_lens`)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task = lens_task(cfg, candidates)
    meta = {"run": "train_joint", "lens_task": _task_meta(task), "lens_weight": lens_weight}
    check_resumable(workdir, meta, resume)
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    tc = cfg.train
    layouts = gist_train_layouts(cfg)
    notes = {"layouts": list(layouts)}

    def evaluate(params, sh, fz, batches):
        return {"substitution": evaluate_substitution(params["gist"], frozen, batches, layouts),
                "lens": evaluate_lens(sh, params, fz, batches, prefix="lens/")}

    job = Job(
        name="train_joint",
        step=steps.JointStep(cfg, tuple(layouts.values()), task, lens_weight=lens_weight,
                             nll_weight=tc.gist_nll_weight, kl_weight=tc.gist_kl_weight,
                             dense=tc.gist_dense),
        optimizer=steps.make_joint_optimizer(cfg.train),
        params={"gist": _start(cfg, "gist", frozen, init_gist, "--init-gist", notes),
                "lens": nets.init_params(cfg, "lens")},
        frozen_inputs=frozen.params, evaluate=evaluate,
        postfix=lambda m: {"gist": f"{float(m['gist/loss']):.4f}",
                           "lens": f"{float(m['lens/loss']):.4f}"},
        meta=meta, notes=notes)
    return run_training(cfg, frozen, workdir, job, resume=resume, progress=progress,
                        eval_batches=eval_batches, stop_after=stop_after)
