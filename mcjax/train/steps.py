"""Sharded, jitted train steps over the ("data", "model") mesh (SPEC §2.8).

Every step is a pure function `step(state, frozen, batch, rng) -> (state, metrics)` where
`state` holds only trainable params and optimizer state, `frozen` is the base model's
params (never differentiated, never updated). Steps are `jax.jit`ted with explicit
in/out `NamedSharding`s (state replicated, base params by `mcjax.sharding` rules, batch on
`data`) and donate the state buffer.
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

from mcjax import sharding
from mcjax.config import ExperimentConfig, TrainConfig
from mcjax.train import losses

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # trainable only, e.g. {"gist": ...} or {"gist": ..., "lens": ...}
    opt_state: Any


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


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def _replicated(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


@dataclasses.dataclass(frozen=True)
class GistStep:
    """The GistNet substitutability step for one experiment and window layout."""

    cfg: ExperimentConfig
    layout: losses.GistLayout
    nll_weight: float = 1.0
    kl_weight: float = 1.0

    def loss(self, trainable, base_params, tokens):
        return losses.gist_loss(trainable["gist"], base_params, tokens,
                                base_cfg=self.base_cfg, gist_cfg=self.cfg.gist,
                                layout=self.layout, nll_weight=self.nll_weight,
                                kl_weight=self.kl_weight)

    @property
    def base_cfg(self):
        return self.cfg.base_config

    def update(self, optimizer, state: TrainState, base_params, tokens, rng):
        del rng  # the objective is deterministic; kept for the common step signature
        grads, metrics = jax.grad(self.loss, has_aux=True)(state.params, base_params, tokens)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

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

    def place_batch(self, tokens) -> jax.Array:
        return jax.device_put(jnp.asarray(tokens), self.batch_sharding)

    def place_rng(self, rng: jax.Array) -> jax.Array:
        return jax.device_put(rng, self.replicated)


def jit_step(step: GistStep, optimizer, mesh: Mesh, state: TrainState, base_params,
             batch_size: int) -> ShardedStep:
    """Jit `step` with explicit in/out shardings over `mesh`; train donates the state."""
    state_sh = _replicated(mesh, state)
    base_sh = sharding.param_shardings(base_params, mesh)
    batch_sh = sharding.batch_sharding(mesh, 2, batch_size)
    replicated = NamedSharding(mesh, P())
    train = jax.jit(functools.partial(step.update, optimizer),
                    in_shardings=(state_sh, base_sh, batch_sh, replicated),
                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
    evaluate = jax.jit(step.evaluate, in_shardings=(state_sh.params, base_sh, batch_sh),
                       out_shardings=replicated)
    return ShardedStep(train, evaluate, state_sh, base_sh, batch_sh, replicated)
