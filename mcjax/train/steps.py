"""Sharded, jitted train steps over the ("data", "model") mesh (SPEC §2.8).

Every step is a pure function `step(state, frozen, batch, rng) -> (state, metrics)` where
`state` holds only trainable params and optimizer state, `frozen` is the base model's
params (never differentiated, never updated). Steps are `jax.jit`ted with explicit
in/out `NamedSharding`s (state replicated, base params by `mcjax.sharding` rules, batch on
`data`) and donate the state buffer.

Steps: `GistStep` (substitutability), `LensStep` (counterfactual focus; GistNet frozen and
passed with the base params as `{"base", "gist"}`), `JointStep` (both, summed, on the
same batches). `jit_step` jits any of them the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mcjax import counterfactuals, scoring, sharding
from mcjax.config import ExperimentConfig, LensConfig, MCConfig, TrainConfig
from mcjax.train import distill, losses

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # trainable only, e.g. {"gist": ...} or {"gist": ..., "lens": ...}
    opt_state: Any
    # EMA of `params` when train.ema_decay > 0 (see `with_ema`), else None
    ema_params: Params = None


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        # start at lr/warmup, not 0: a first step that cannot move any parameter is wasted
        init_value=train.learning_rate / max(train.warmup_steps, 1),
        peak_value=train.learning_rate,
        warmup_steps=max(train.warmup_steps, 1),
        decay_steps=max(train.steps, train.warmup_steps + 1), end_value=0.1 * train.learning_rate)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                       optax.adamw(schedule, weight_decay=train.weight_decay))


def init_state(params: Params, optimizer: optax.GradientTransformation, *,
               ema: bool = False) -> TrainState:
    """Step 0 of `params`; `ema` starts their moving average at the params themselves."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The EMA decay used after `step` updates: min(decay, (1+t)/(10+t)), a warm-up so
    the average is not dominated by the init in a short run."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def with_ema(before: TrainState, after: TrainState, decay: float) -> TrainState:
    """`after` carrying the moving average of `before` updated with `after.params`
    (unchanged when `before` keeps no average). Steps build their new state without it."""
    if before.ema_params is None:
        return after
    d = ema_decay_at(decay, after.step)
    ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype),
                       before.ema_params, after.params)
    return after.replace(ema_params=ema)


def _replicated(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def grads_cycling_layouts(grad_fn, layouts, step, params):
    """(grads, metrics + `layout` index) of `grad_fn(params, layout)` for the layout of
    this step, layouts[step % len(layouts)]: a `lax.switch` on the traced step, so every
    layout shares one compiled step."""
    def branch(index, layout):
        def run(p):
            grads, metrics = grad_fn(p, layout)
            return grads, dict(metrics, layout=jnp.asarray(index, jnp.int32))
        return run

    branches = [branch(i, lay) for i, lay in enumerate(layouts)]
    if len(branches) == 1:
        return branches[0](params)
    return jax.lax.switch(step % len(branches), branches, params)


@dataclasses.dataclass(frozen=True)
class GistStep:
    """The GistNet substitutability step for one experiment and its window layouts.

    With several `layouts`, step s trains on layouts[s % len(layouts)] (e.g. 1, 4 and 17
    raw blocks, LOD1+LOD2): one layout alone would leave the others' regimes untrained
    (LOD1 gists seen only through their LOD2 parent, few gists, many gists). The choice is
    a `lax.switch` on the traced step counter, so every layout shares one compiled step;
    metrics carry the `layout` index so each branch can be logged on its own.
    """

    cfg: ExperimentConfig
    layouts: tuple[scoring.GistLayout, ...]
    nll_weight: float = 1.0
    kl_weight: float = 1.0
    dense: bool = False

    def __post_init__(self):
        if not self.layouts:
            raise ValueError("GistStep needs at least one layout")

    @property
    def layout(self) -> scoring.GistLayout:
        return self.layouts[0]

    def loss(self, trainable, base_params, tokens, layout: scoring.GistLayout | None = None):
        return losses.gist_loss(trainable["gist"], base_params, tokens,
                                base_cfg=self.base_cfg, gist_cfg=self.cfg.gist,
                                layout=layout or self.layout, nll_weight=self.nll_weight,
                                kl_weight=self.kl_weight, dense=self.dense)

    @property
    def base_cfg(self):
        return self.cfg.base_config

    def _grads(self, params, base_params, tokens, layout):
        return jax.grad(functools.partial(self.loss, layout=layout), has_aux=True)(
            params, base_params, tokens)

    def update(self, optimizer, state: TrainState, base_params, tokens, rng):
        del rng  # the objective is deterministic; kept for the common step signature

        grads, metrics = grads_cycling_layouts(
            lambda params, layout: self._grads(params, base_params, tokens, layout),
            self.layouts, state.step, state.params)
        return _apply_grads(optimizer, state, grads, metrics)

    def evaluate(self, trainable, base_params, tokens):
        return self.loss(trainable, base_params, tokens)[1]


@dataclasses.dataclass(frozen=True)
class ShardedStep:
    """A step's jitted train/eval functions and the shardings their inputs must carry.

    Put inputs in place with `place_*` first: a committed single-device array where a
    mesh sharding is declared would otherwise force a second compilation.
    """

    train: Callable  # (state, base_params, tokens, rng) -> (state, metrics); donates state
    evaluate: Callable  # (trainable, base_params, tokens) -> metrics
    state_sharding: Any
    base_sharding: Any
    batch_sharding: NamedSharding
    replicated: NamedSharding

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.state_sharding)

    def place_base(self, base_params: Params) -> Params:
        return jax.device_put(base_params, self.base_sharding)

    def place_batch(self, batch) -> Any:
        """A batch (token windows, or a step's batch pytree) on the batch sharding."""
        return jax.device_put(jax.tree.map(jnp.asarray, batch), self.batch_sharding)

    def place_rng(self, rng: jax.Array) -> jax.Array:
        return jax.device_put(rng, self.replicated)


def frozen_shardings(step, frozen, mesh: Mesh) -> Any:
    """Shardings of a step's frozen input: the step's own rule (`step.frozen_shardings`) if
    it has one, else the base-model parameter rules of `mcjax.sharding`."""
    rule = getattr(step, "frozen_shardings", None)
    return rule(frozen, mesh) if rule is not None else sharding.param_shardings(frozen, mesh)


def jit_step(step: "Step", optimizer, mesh: Mesh, state: TrainState, base_params,
             batch_size: int, *, ema_decay: float = 0.0) -> ShardedStep:
    """Jit `step` with explicit in/out shardings over `mesh`; train donates the state.

    `step` is a GistStep, LensStep or JointStep; `base_params` is whatever the step takes
    as its frozen input (the base params, or for LensStep `{"base", "gist"}`). When `state`
    keeps `ema_params`, every train step also updates them with `ema_decay`."""
    if state.ema_params is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"a state with ema_params needs 0 < ema_decay < 1, got {ema_decay}")

    def update(state, frozen, tokens, rng):
        new, metrics = step.update(optimizer, state, frozen, tokens, rng)
        return with_ema(state, new, ema_decay), metrics

    state_sh = _replicated(mesh, state)
    base_sh = frozen_shardings(step, base_params, mesh)
    # the leading (batch) axis of every leaf of a batch on `data`: token windows [B, S],
    # or a step's own batch pytree (`batch_ndim` 1: any leaf rank)
    batch_sh = sharding.batch_sharding(mesh, getattr(step, "batch_ndim", 2), batch_size)
    replicated = NamedSharding(mesh, P())
    train = jax.jit(update, in_shardings=(state_sh, base_sh, batch_sh, replicated),
                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
    evaluate = jax.jit(step.evaluate, in_shardings=(state_sh.params, base_sh, batch_sh),
                       out_shardings=replicated)
    return ShardedStep(train, evaluate, state_sh, base_sh, batch_sh, replicated)


def _apply_grads(optimizer, state: TrainState, grads, metrics):
    """One optimizer step; the EMA (if any) is `jit_step`'s to update."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      ema_params=state.ema_params), metrics


@dataclasses.dataclass(frozen=True)
class LensStep:
    """LensNet on counterfactual focus utilities, GistNet and the base model frozen.

    Trainable state: `{"lens": ...}`. Frozen input: `{"base": base params, "gist": GistNet
    params}` (build it with `frozen_inputs`); GistNet params are replicated on the mesh.
    The rng of `update` draws each example's layout and candidates; `evaluate` uses a fixed
    key (`eval_seed`), so held-out losses are comparable across evaluations, and also
    reports ΔNLL@H of the compressed WC against the full window.
    """

    cfg: ExperimentConfig
    task: counterfactuals.LensTask
    weights: losses.LensLossConfig = losses.LensLossConfig()
    eval_seed: int = 0

    @staticmethod
    def frozen_inputs(base_params, gist_params) -> dict:
        return {"base": base_params, "gist": gist_params}

    @staticmethod
    def frozen_shardings(frozen, mesh: Mesh) -> dict:
        return {"base": sharding.param_shardings(frozen["base"], mesh),
                "gist": _replicated(mesh, frozen["gist"])}

    @property
    def base_cfg(self):
        return self.cfg.base_config

    def counterfactuals(self, gist_params, base_params, tokens, rng, with_full_context=False):
        return counterfactuals.gistnet_counterfactuals(gist_params, self.cfg.gist, base_params,
                                                       self.base_cfg, tokens, rng, self.task,
                                                       with_full_context=with_full_context)

    def objective(self, lens_params, cf):
        return losses.lens_objective(lens_params, cf, lens_cfg=self.cfg.lens, mc=self.task.mc,
                                     weights=self.weights)

    def loss(self, trainable, frozen, tokens, rng, with_full_context=False):
        cf = self.counterfactuals(frozen["gist"], frozen["base"], tokens, rng,
                                  with_full_context)
        return self.objective(trainable["lens"], cf)

    def update(self, optimizer, state: TrainState, frozen, tokens, rng):
        # utilities first (no gradient path), then differentiate LensNet's scoring only
        cf = self.counterfactuals(frozen["gist"], frozen["base"], tokens, rng)
        grads, metrics = jax.grad(lambda p: self.objective(p["lens"], cf), has_aux=True)(
            state.params)
        return _apply_grads(optimizer, state, grads, metrics)

    def evaluate(self, trainable, frozen, tokens):
        return self.loss(trainable, frozen, tokens, jax.random.key(self.eval_seed),
                         with_full_context=True)[1]


@dataclasses.dataclass(frozen=True)
class JointStep:
    """GistNet and LensNet trained together on the same batches: *summed* objectives, one
    gradient step of both nets per batch.

    loss = gist_loss(gist) + lens_weight · lens_loss(lens | gists of the current GistNet).
    The lens term sees GistNet through stop_gradient (its utilities are targets), so each
    net gets exactly its own objective's gradient; summing rather than alternating keeps
    LensNet's utilities tracking the GistNet being trained, at every step. The GistNet term
    is `GistStep`'s (same `layouts`, cycled per step with a `lax.switch`; same weights and
    `dense`), so a joint run trains GistNet on what `train_gist` would. Use
    `make_joint_optimizer` so global-norm clipping is per net. Trainable state:
    `{"gist", "lens"}`; frozen input: the base params (as GistStep). Metrics are prefixed
    `gist/` and `lens/`, beside `loss` and the `layout` index of the step.
    """

    cfg: ExperimentConfig
    layouts: tuple[scoring.GistLayout, ...]
    task: counterfactuals.LensTask
    lens_weight: float = 1.0
    nll_weight: float = 1.0
    kl_weight: float = 1.0
    dense: bool = False
    weights: losses.LensLossConfig = losses.LensLossConfig()
    eval_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.layouts, tuple) or not self.layouts:
            raise ValueError("JointStep needs a non-empty tuple of GistLayouts, got "
                             f"{type(self.layouts).__name__}")

    @property
    def layout(self) -> scoring.GistLayout:
        return self.layouts[0]

    @property
    def gist_step(self) -> GistStep:
        return GistStep(self.cfg, self.layouts, self.nll_weight, self.kl_weight, self.dense)

    @property
    def lens_step(self) -> LensStep:
        return LensStep(self.cfg, self.task, self.weights, self.eval_seed)

    def _total(self, trainable, base_params, tokens, cf, layout=None):
        g_loss, g_metrics = self.gist_step.loss(trainable, base_params, tokens, layout)
        l_loss, l_metrics = self.lens_step.objective(trainable["lens"], cf)
        metrics = {"loss": g_loss + self.lens_weight * l_loss,
                   **{f"gist/{k}": v for k, v in g_metrics.items()},
                   **{f"lens/{k}": v for k, v in l_metrics.items()}}
        return metrics["loss"], metrics

    def update(self, optimizer, state: TrainState, base_params, tokens, rng):
        cf = self.lens_step.counterfactuals(state.params["gist"], base_params, tokens, rng)

        grads, metrics = grads_cycling_layouts(
            lambda params, layout: jax.grad(functools.partial(self._total, layout=layout),
                                            has_aux=True)(params, base_params, tokens, cf),
            self.layouts, state.step, state.params)
        metrics = dict(metrics, **{f"{k}/grad_norm": optax.tree.norm(g)
                                   for k, g in grads.items()})
        return _apply_grads(optimizer, state, grads, metrics)

    def evaluate(self, trainable, base_params, tokens):
        cf = self.lens_step.counterfactuals(trainable["gist"], base_params, tokens,
                                            jax.random.key(self.eval_seed),
                                            with_full_context=True)
        return self._total(trainable, base_params, tokens, cf)[1]


def make_joint_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """`make_optimizer` applied to each top-level entry of the trainable params separately
    (per-net clipping and moments), e.g. {"gist": ..., "lens": ...}."""
    return optax.multi_transform(
        {"gist": make_optimizer(train), "lens": make_optimizer(train)},
        lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()})


@dataclasses.dataclass(frozen=True)
class DistillStep:
    """LensNet v2 fitted to a teacher's slot scores on recorded focus states
    (`mcjax.train.distill`). Trainable state: `{"lens": ...}`; no frozen input (a state
    holds everything LensNet reads); a batch is a `distill.DistillBatch` (`batch_ndim` 1:
    its leaves are split on their leading axis only)."""

    lens_cfg: LensConfig
    mc: MCConfig
    batch_ndim = 1

    @staticmethod
    def frozen_shardings(frozen, mesh: Mesh) -> None:
        return None

    def loss(self, trainable, batch):
        return distill.distill_loss(trainable["lens"], batch, self.lens_cfg, self.mc)

    def update(self, optimizer, state: TrainState, frozen, batch, rng):
        del frozen, rng  # the objective is deterministic and reads the batch only
        grads, metrics = jax.grad(self.loss, has_aux=True)(state.params, batch)
        return _apply_grads(optimizer, state, grads, metrics)

    def evaluate(self, trainable, frozen, batch):
        del frozen
        return self.loss(trainable, batch)[1]


Step = Any  # GistStep | LensStep | JointStep | DistillStep: update(optimizer, state, frozen,
# batch, rng)
