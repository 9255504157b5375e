"""Training loops (big_vision style: one readable loop, `run_training`, shared by all) and
their evaluations.

`train_gist(cfg, workdir)` resumes from the latest checkpoint in `workdir` by default,
logs metrics as JSON lines to `workdir/metrics.jsonl`, evaluates held-out ΔNLL@H beside
the truncation and mean-pooling baselines, and checkpoints state + data position.
`train_lens` (LensNet on counterfactual utilities, GistNet frozen: trained from a gist
workdir or untrained), `train_joint` (both nets, summed objectives) and `train_distill`
(LensNet v2 on a teacher's scores of recorded focus states) do the same.
Randomness per step is `fold_in(seed, step)` and the data position is checkpointed, so a
killed and resumed run ends with the same params as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mcjax import counterfactuals, data, nets, scoring, sharding
from mcjax.checkpoint import Checkpointer
from mcjax.config import ConfigError, ExperimentConfig, config_to_json
from mcjax.counterfactuals import lens_task
from mcjax.lens import init_lens
from mcjax.scoring import Frozen, evaluate_substitution, load_frozen, window_prefix_len
from mcjax.train import distill, steps


def gist_layout(cfg: ExperimentConfig, use_lod2: bool = True, keep_raw_blocks: int = 1
                ) -> scoring.GistLayout:
    return scoring.GistLayout.build(cfg.mc, window_prefix_len(cfg), use_lod2=use_lod2,
                                   keep_raw_blocks=keep_raw_blocks)


def gist_train_layouts(cfg: ExperimentConfig) -> dict[str, scoring.GistLayout]:
    """The layouts GistNet steps cycle over (`train.gist_keep_raw`, `train.gist_lod2`),
    named as in the evaluation (`lod1_keep4`, `lod1+lod2_keep1`); duplicates dropped."""
    out: dict[str, scoring.GistLayout] = {}
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
    # the step's own data instead of the corpus's token windows: endless training batches
    # with state() / restore() (checkpointed like the windows' position), held-out batches
    batches: Any = None
    eval_set: list | None = None
    throughput: tuple[str, int] | None = None  # (metric, items per step); default tokens/s


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


def run_training(cfg: ExperimentConfig, frozen: Frozen | None, workdir: Path, job: Job, *,
                 resume: bool, progress: bool, eval_batches: int, stop_after: int | None,
                 stop_after_s: float | None = None) -> dict[str, Any]:
    """The loop every trainer shares: sharded jitted step, resumable data, checkpoints with
    the data position, metrics.jsonl, held-out evaluation before / during / after.

    Data: the corpus's token windows (train split; `eval_batches` held-out batches), or the
    job's own `batches` / `eval_set` (then `frozen` may be None). `stop_after` steps or
    `stop_after_s` seconds end the run early (checkpointed; a time stop also evaluates)."""
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
    if job.batches is None:
        corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "train",
                                       separator=frozen.separator, progress=progress)
        batches = data.WindowIterator(corpus.tokens, tc.batch_size, tc.seq_len, seed=tc.seed)
    else:
        batches = job.batches
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    log = MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard")
    if job.evaluate is None:
        eval_set = []
    elif job.eval_set is not None:
        eval_set = job.eval_set
    else:
        eval_set = (data.held_out_batches(frozen, eval_batches, tc.batch_size, tc.seq_len)
                    if eval_batches else [])

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
    rate_name, items_per_step = job.throughput or ("tokens_per_s", tc.batch_size * tc.seq_len)
    t_start, out_of_time = time.perf_counter(), False
    bar = tqdm(range(start, end), initial=start, total=tc.steps, desc=job.name,
               disable=not progress)
    t_last, logged_at, metrics, pending = time.perf_counter(), start, {}, []
    for step in bar:
        batch = sharded.place_batch(next(batches))
        rng = sharded.place_rng(jax.random.fold_in(jax.random.key(tc.seed), step))
        state, metrics = sharded.train(state, frozen_placed, batch, rng)
        pending.append(metrics)
        done = step + 1
        if stop_after_s is not None and time.perf_counter() - t_start > stop_after_s:
            out_of_time, end = True, done
        if done % tc.log_every == 0 or done == end:
            now = time.perf_counter()
            # the first interval includes compilation; later ones are steady-state
            rate = items_per_step * (done - logged_at) / max(now - t_last, 1e-9)
            t_last, logged_at = now, done
            # One row per layout seen since the last log (steps may cycle over layouts:
            # logging only every log_every-th step would show a single one of them).
            for metrics in _mean_by_layout(jax.device_get(pending)):
                metrics[rate_name] = rate
                log.write(done, "train", metrics)
            pending = []
            bar.set_postfix(**job.postfix(metrics))
        if eval_set and done % tc.eval_every == 0 and done != end:
            evaluate_and_log(done, state)
        if done % tc.checkpoint_every == 0 or done == end:
            ckpt.save(done, state, batches.state(), cfg, run_meta)
        if out_of_time:
            break
    ckpt.wait()
    ckpt.close()
    if (end == tc.steps or out_of_time) and eval_set:
        result["eval_after"] = evaluate_and_log(end, state)
    log.close()
    result.update(end_step=end, out_of_time=out_of_time,
                  last_train_metrics=_to_py(jax.device_get(metrics)), workdir=str(workdir))
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


def _task_meta(task: counterfactuals.LensTask) -> dict:
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


# --------------------------------------------------------------------------- LensNet v2


def train_distill(cfg: ExperimentConfig, workdir: str | os.PathLike,
                  train_states: dict[str, np.ndarray], val_states: dict[str, np.ndarray], *,
                  resume: bool = True, progress: bool = True, stop_after: int | None = None,
                  stop_after_s: float | None = None) -> dict[str, Any]:
    """Distil LensNet v2 from a teacher's slot scores on recorded focus states
    (`mcjax.train.distill`; stacked state arrays, e.g. `experiments/distill_lens.py`'s
    shards) through the shared loop: `steps.DistillStep` with `cfg.train`'s optimizer,
    batches of `cfg.train.batch_size` states, orbax checkpoints with the batches' position,
    metrics.jsonl and TensorBoard; held-out metrics on `val_states` (`distill_metrics`).
    The WC budget is the states' (their slot count)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not cfg.lens.conditioned:
        raise ConfigError("distillation trains LensNet v2 (lens.query_tokens > 0 or "
                          "lens.retrieval_features); this config's LensNet is v1")
    tc = cfg.train
    cfg = dataclasses.replace(cfg, mc=dataclasses.replace(
        cfg.mc, w_max=int(train_states["target"].shape[-1])))
    meta = {"run": "train_distill", "train_states": int(len(train_states["target"])),
            "val_states": int(len(val_states["target"]))}
    check_resumable(workdir, meta, resume)
    step = steps.DistillStep(cfg.lens, cfg.mc)
    lens = init_lens(cfg.lens, cfg.mc, train_states["slot_embeds"].shape[-1],
                     jax.random.key(tc.seed), hidden_dim=train_states["query_hidden"].shape[-1])

    def evaluate(params, sharded, frozen_placed, batches):
        return distill.mean_metrics([jax.device_get(sharded.evaluate(
            params, frozen_placed, sharded.place_batch(b))) for b in batches])

    job = Job(name="distill", step=step, optimizer=steps.make_optimizer(tc),
              params={"lens": lens}, frozen_inputs=None, evaluate=evaluate,
              postfix=lambda m: {"mse": f"{float(m['mse']):.4f}"}, meta=meta,
              batches=distill.StateBatches(train_states, tc.batch_size, seed=tc.seed),
              eval_set=distill.eval_batches(val_states, tc.batch_size),
              throughput=("states_per_s", tc.batch_size))
    return run_training(cfg, None, workdir, job, resume=resume, progress=progress,
                        eval_batches=0, stop_after=stop_after, stop_after_s=stop_after_s)
