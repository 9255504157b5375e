"""Training objectives (SPEC §2.8): the GistNet substitutability loss and the LensNet loss.

GistNet (`gist_loss`): a window's compressed context (`mcjax.scoring.GistLayout`: [sink ‖
gists ‖ raw tail ‖ continuation]) should predict the continuation as the raw window does:
NLL on the scored targets plus KL to the uncompressed context's distribution. The gists
flow into the frozen base model as input embeddings; gradients reach GistNet only (the
base params are a separate, undifferentiated pytree).

LensNet (`lens_objective`, `lens_loss`): its scores of a compressed WC's candidate actions
should order them as their counterfactual values do (`mcjax.counterfactuals`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mcjax import lens as lens_lib
from mcjax import working_context as wcm
from mcjax.config import GistConfig, LensConfig, LlamaConfig, MCConfig
from mcjax.counterfactuals import (UTILITY_EPS, Counterfactuals, LensTask, candidate_scores,
                                   gistnet_counterfactuals, normalized_utility)
from mcjax.scoring import (GistLayout, full_context_nll, gist_inputs, kl_to_teacher,
                           substitution_nll)

Params = Any


def gist_loss(gist_params, base_params, tokens: jax.Array, *, base_cfg: LlamaConfig,
              gist_cfg: GistConfig, layout: GistLayout, nll_weight: float = 1.0,
              kl_weight: float = 1.0, dense: bool = False
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Substitutability loss: nll_weight·NLL + kl_weight·KL(full ‖ compressed), over the
    H continuation targets or (dense) every raw-tail position. Metrics `delta_nll` and
    `kl_h` are always over the H continuation targets, comparable across layouts."""
    base_params = jax.lax.stop_gradient(base_params)
    full_nll, full_logp = full_context_nll(base_params, base_cfg, tokens, layout, dense)
    full_nll, full_logp = jax.lax.stop_gradient((full_nll, full_logp))
    fn, children = gist_inputs("gistnet", base_params, base_cfg, gist_params, gist_cfg,
                               tokens[:, : layout.raw_start])
    nll, logp = substitution_nll(base_params, base_cfg, tokens, layout, fn, children=children,
                                 dense=dense)
    kl = kl_to_teacher(full_logp, logp)
    loss = nll_weight * nll.mean() + kl_weight * kl.mean()
    H = layout.horizon
    return loss, {"loss": loss, "nll": nll[:, -H:].mean(), "nll_full": full_nll[:, -H:].mean(),
                  "delta_nll": (nll - full_nll)[:, -H:].mean(), "kl": kl.mean(),
                  "kl_h": kl[:, -H:].mean()}


# =========================================================================== LensNet
#
# The lens objective on precomputed counterfactuals (`mcjax.counterfactuals`).
#
# Loss on LensNet's scores (gradients reach LensNet only; the utilities are constants):
#   regression · mean (ŝ − target)²   ŝ = the slot's score (expand) or the group's mean
#                                       score (collapse), exactly what the allocator reads
# + ranking    · Bradley–Terry: −log σ(β (ŝ_i − ŝ_j)) over candidate pairs with
#                value_i > value_j, weighted by |target_i − target_j|, mean over pairs
# + budget     · (Σ_legal-expands relu(s) − Σ_legal-groups relu(−mean s))² / n_legal²:
#                expansion pressure is balanced by collapse pressure
# + illegal    · mean over valid slots of the squared illegal part of the *unmasked* score
#                (LOD0 expanding, top level / protected tail collapsing); the output mask
#                hides these, the penalty keeps the raw head honest
# =========================================================================== LensNet


@dataclasses.dataclass(frozen=True)
class LensLossConfig:
    """Weights of the lens objective's terms and its two scales."""

    regression: float = 1.0
    ranking: float = 0.5
    budget: float = 0.1
    illegal: float = 0.1
    bt_scale: float = 4.0  # β of the Bradley–Terry logistic on score differences in (−2, 2)
    utility_eps: float = UTILITY_EPS  # nats/token: the resolution of utilities


def lens_scores_and_raw(lens_params, lens_cfg: LensConfig, mc: MCConfig, slot_embeds, wc,
                        tail, query=None, slot_retrieval=None) -> tuple[jax.Array, jax.Array]:
    """LensNet's legality-masked scores and its unmasked tanh scores (the `head` output,
    captured), both [..., W]; v2 also reads `query` and `slot_retrieval`."""
    scores, state = lens_lib.LensNet(lens_cfg, mc).apply(
        {"params": lens_params}, slot_embeds, wc, tail, query, slot_retrieval,
        capture_intermediates=lambda module, method: module.name == "head")
    raw = jnp.tanh(state["intermediates"]["head"]["__call__"][0][..., 0].astype(jnp.float32))
    return scores, raw


def lens_objective(lens_params, cf: Counterfactuals, *, lens_cfg: LensConfig, mc: MCConfig,
                   weights: LensLossConfig = LensLossConfig()
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The lens loss (see the section comment) and its metrics for precomputed
    counterfactuals."""
    K, L = mc.block_size, mc.num_levels
    wc, cands, valid = cf.wc, cf.candidates, cf.valid
    scores, raw = lens_scores_and_raw(lens_params, lens_cfg, mc, cf.slot_embeds, wc, cf.tail,
                                      *cf.lens_inputs())
    pred = jax.vmap(lambda s, c: candidate_scores(s, c, K))(scores, cands)  # [B, C]
    target = normalized_utility(cf.value, valid, weights.utility_eps)
    validf = valid.astype(jnp.float32)
    n_valid = jnp.maximum(validf.sum(), 1.0)
    regression = jnp.sum(validf * (pred - target) ** 2) / n_valid

    # Bradley–Terry over ordered pairs (i better than j) within each example
    pair = valid[:, :, None] & valid[:, None, :] & (cf.value[:, :, None] > cf.value[:, None, :])
    pair_w = jnp.where(pair, jnp.abs(target[:, :, None] - target[:, None, :]), 0.0)
    diff = pred[:, :, None] - pred[:, None, :]
    # mean over ordered pairs (not over their weights): near-ties carry ~no loss at all
    ranking = (jnp.sum(pair_w * jax.nn.softplus(-weights.bt_scale * diff))
               / jnp.maximum(jnp.sum(pair), 1))
    pair_accuracy = jnp.sum(pair & (diff > 0)) / jnp.maximum(jnp.sum(pair), 1)

    # zero-sum budget: expansion pressure balanced by collapse pressure, per example
    legal_exp = wcm.legal_expand_mask(wc.level, wc.valid, mc)
    heads = jax.vmap(lambda w: wcm.legal_collapse_heads(w.level, w.node, w.valid,
                                                        w.num_tokens, mc))(wc)
    group_mean = jax.vmap(lambda s: wcm.group_windows(s, K, 0.0).mean(-1))(scores)
    push = (jnp.sum(jnp.where(legal_exp, jax.nn.relu(scores), 0.0), -1)
            - jnp.sum(jnp.where(heads, jax.nn.relu(-group_mean), 0.0), -1))
    n_legal = jnp.maximum(jnp.sum(legal_exp, -1) + jnp.sum(heads, -1), 1)
    budget = jnp.mean((push / n_legal) ** 2)

    # illegal directions of the unmasked head
    prot = wcm.protected_mask(wc.level, wc.node, wc.valid, wc.num_tokens, mc)
    bad_up = wc.valid & (wc.level == 0)
    bad_down = wc.valid & ((wc.level >= L) | prot)
    illegal = (jnp.sum(jnp.where(bad_up, jax.nn.relu(raw) ** 2, 0.0)
                       + jnp.where(bad_down, jax.nn.relu(-raw) ** 2, 0.0))
               / jnp.maximum(jnp.sum(wc.valid), 1))

    loss = (weights.regression * regression + weights.ranking * ranking
            + weights.budget * budget + weights.illegal * illegal)
    metrics = {"loss": loss, "regression": regression, "ranking": ranking, "budget": budget,
               "illegal": illegal, "pair_accuracy": pair_accuracy,
               "score_target_corr": _masked_corr(pred, target, valid),
               "score_value_corr": _masked_corr(pred, cf.value, valid),
               "candidates_valid": jnp.mean(validf),
               "value_abs": jnp.sum(validf * jnp.abs(cf.value)) / n_valid,
               "nll_wc": cf.nll[:, 0].mean()}
    if cf.nll_full is not None:
        metrics["delta_nll_wc"] = (cf.nll[:, 0] - cf.nll_full).mean()
    return loss, metrics


def _masked_corr(x, y, mask):
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    xc = (x - jnp.sum(m * x) / n) * m
    yc = (y - jnp.sum(m * y) / n) * m
    return jnp.sum(xc * yc) / jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc) + 1e-12)


def lens_loss(lens_params, gist_params, base_params, tokens: jax.Array, rng: jax.Array, *,
              base_cfg: LlamaConfig, gist_cfg: GistConfig, lens_cfg: LensConfig,
              task: LensTask, weights: LensLossConfig = LensLossConfig(),
              with_full_context: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Counterfactual focus loss of LensNet for a batch of windows. GistNet and the base
    model are frozen here (their params only produce constants)."""
    cf = gistnet_counterfactuals(gist_params, gist_cfg, base_params, base_cfg, tokens, rng,
                                 task, with_full_context=with_full_context)
    return lens_objective(lens_params, cf, lens_cfg=lens_cfg, mc=task.mc, weights=weights)
