"""The GistNet training loop (big_vision style: one readable loop) and its evaluation.

`train_gist(cfg, workdir)` resumes from the latest checkpoint in `workdir` by default,
logs metrics as JSON lines to `workdir/metrics.jsonl`, evaluates held-out ΔNLL@H beside
the truncation and mean-pooling baselines, and checkpoints state + data position.
Randomness per step is `fold_in(seed, step)` and the data position is checkpointed, so a
killed and resumed run ends with the same params as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import sharding
from mcjax.checkpoint import Checkpointer
from mcjax.config import ExperimentConfig
from mcjax.gist import init_gist_params
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


def gist_layout(cfg: ExperimentConfig, use_lod2: bool = True) -> losses.GistLayout:
    H = cfg.mc.horizon
    prefix = cfg.train.seq_len - H
    if prefix <= 0 or prefix % cfg.mc.block_size:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) minus mc.horizon ({H}) must be "
                         f"a positive multiple of block_size ({cfg.mc.block_size})")
    return losses.GistLayout.build(cfg.mc, prefix, use_lod2=use_lod2)


def held_out_batches(frozen: Frozen, num: int, batch_size: int, seq_len: int,
                     seed: int = 1234) -> list[np.ndarray]:
    corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                                   separator=frozen.separator, progress=False)
    it = data.WindowIterator(corpus.tokens, batch_size, seq_len, seed=seed)
    return [next(it) for _ in range(num)]


VARIANTS = ("gistnet", "mean_pool", "truncation")


@functools.partial(jax.jit, static_argnames=("base_cfg", "gist_cfg", "layout", "variant"))
def variant_nll(base_params, gist_params, tokens, *, base_cfg, gist_cfg, layout, variant):
    """NLL [B, H] of the continuation under one context variant (same targets for all)."""
    if variant == "full":
        return losses.full_context_nll(base_params, base_cfg, tokens, layout)[0]
    fn = {"gistnet": lambda: losses.gistnet_fn(gist_params, gist_cfg, base_cfg.hidden_size),
          "mean_pool": lambda: losses.mean_pool_gist_fn,
          "truncation": lambda: None}[variant]()
    return losses.substitution_nll(base_params, base_cfg, tokens, layout, fn)[0]


def evaluate_substitution(gist_params, frozen: Frozen, batches: list[np.ndarray],
                          layouts: dict[str, losses.GistLayout]) -> dict[str, Any]:
    """Held-out ΔNLL@H of GistNet gists vs truncation and mean pooling, per layout.

    Every variant of a window is scored on the identical continuation targets.
    """
    cfg = frozen.cfg
    out: dict[str, Any] = {}
    for name, layout in layouts.items():
        sums = {k: 0.0 for k in ("full", *VARIANTS)}
        count = 0
        for batch in batches:
            tokens = jnp.asarray(batch)
            for variant in sums:
                nll = variant_nll(frozen.params, gist_params, tokens, base_cfg=cfg.base_config,
                                  gist_cfg=cfg.gist, layout=layout, variant=variant)
                sums[variant] += float(jnp.sum(nll))
            count += tokens.shape[0] * layout.horizon
        out[name] = {
            "compression_ratio": layout.compression_ratio,
            "compressed_tokens": layout.raw_start,
            "gists": layout.num_gists,
            "nll_full": sums["full"] / count,
            **{f"delta_nll_{k}": (sums[k] - sums["full"]) / count for k in VARIANTS},
        }
    return out


class MetricsLog:
    """Append-only JSON-lines metrics file (one object per line, `step` in each)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, kind: str, values: dict) -> None:
        row = {"step": int(step), "kind": kind, "time": time.time(),
               **{k: _to_py(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


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


def train_gist(cfg: ExperimentConfig, workdir: str | os.PathLike, *, resume: bool = True,
               progress: bool = True, eval_batches: int = 4,
               stop_after: int | None = None) -> dict[str, Any]:
    """Train GistNet on substitutability; returns the final metrics and evaluations.

    `stop_after` ends the process's work after that many steps of this call (the run can be
    resumed later), which tests use to emulate interruptions deterministically.
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    frozen = load_frozen(cfg)
    cfg = frozen.cfg
    layout = gist_layout(cfg)
    layouts = {"lod1": gist_layout(cfg, use_lod2=False), "lod1+lod2": layout}
    tc = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    optimizer = steps.make_optimizer(tc)
    gist_params = init_gist_params(cfg.gist, cfg.base_config.hidden_size,
                                   jax.random.key(tc.seed), block_size=cfg.mc.block_size)
    state = steps.init_state({"gist": gist_params}, optimizer)
    step_fn = steps.GistStep(cfg, layout)
    sharded = steps.jit_step(step_fn, optimizer, mesh, state, frozen.params, tc.batch_size)
    corpus = data.tokenized_corpus(frozen.encode, frozen.tokenizer_id, "train",
                                   separator=frozen.separator, progress=progress)
    batches = data.WindowIterator(corpus.tokens, tc.batch_size, tc.seq_len, seed=tc.seed)
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    log = MetricsLog(workdir / "metrics.jsonl")
    eval_set = (held_out_batches(frozen, eval_batches, tc.batch_size, tc.seq_len)
                if eval_batches else [])

    start = 0
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state, cfg)
        batches.restore(meta["data_position"])
        start = int(state.step)
    base_params = sharded.place_base(frozen.params)
    state = sharded.place_state(state)
    result: dict[str, Any] = {"start_step": start}
    if start == 0 and eval_set:
        result["eval_before"] = evaluate_substitution(
            state.params["gist"], frozen, eval_set, layouts)
        log.write(0, "eval", result["eval_before"])

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    tokens_per_step = tc.batch_size * tc.seq_len
    bar = tqdm(range(start, end), initial=start, total=tc.steps, desc="train_gist",
               disable=not progress)
    t_last, metrics = time.perf_counter(), {}
    for step in bar:
        batch = sharded.place_batch(next(batches))
        rng = sharded.place_rng(jax.random.fold_in(jax.random.key(tc.seed), step))
        state, metrics = sharded.train(state, base_params, batch, rng)
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            steps_done = (done - start) if done == end else tc.log_every
            metrics["tokens_per_s"] = tokens_per_step * min(steps_done, tc.log_every) / max(
                now - t_last, 1e-9)
            t_last = now
            log.write(done, "train", metrics)
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                            dnll=f"{float(metrics['delta_nll']):+.4f}")
        if eval_set and done % tc.eval_every == 0 and done != end:
            log.write(done, "eval", evaluate_substitution(state.params["gist"], frozen,
                                                          eval_set, layouts))
        if done % tc.checkpoint_every == 0 or done == end:
            ckpt.save(done, state, batches.state(), cfg)
    ckpt.wait()
    ckpt.close()
    if end == tc.steps and eval_set:
        result["eval_after"] = evaluate_substitution(state.params["gist"], frozen, eval_set,
                                                     layouts)
        log.write(end, "eval", result["eval_after"])
    result.update(end_step=end, last_train_metrics=_to_py(jax.device_get(metrics)),
                  workdir=str(workdir))
    result["state"] = state
    return result
