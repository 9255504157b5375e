"""The embedding-space ceiling of gist substitution (SPEC §2.9).

For each held-out window, free vectors in the gist slots of a compressed layout are
optimised directly — no GistNet, one set per window — to make the frozen base model's
continuation distribution match the uncompressed one:

    min over V [B, G, D]   mean over the H continuation targets of
                           KL( p_full(· | window) ‖ p(· | [sink ‖ V ‖ raw tail ‖ cont.]) )

with Adam (optax; cosine decay to `final_lr_fraction`), starting from the mean-pooled token
embeddings of each gisted block (LOD2 slots: the mean of their LOD1 means), the
`mean_pool` baseline, or (`init="gistnet"`) from a GistNet's own gists of the window, so
the optimum found is never worse than that net and few steps refine it.

`fit="continuation"` fits the very targets it is scored on, an oracle that may overfit
them (18k free numbers per window at 32:1 against 64 targets). `fit="tail"` fits only the
raw tail's next-token distributions *before* the continuation (targets
tokens[raw_start + 1 : P], causal, so the fit never sees a continuation token) and scores
the unseen continuation: what vectors fitted from the window's past alone carry forward —
the bound a GistNet, which sees only the past, can aim for. The vectors are
the only trainable leaves; one jitted step updates a whole batch of windows (each window's loss depends only on its own vectors, so the batch
is B independent problems). The ΔNLL@H the vectors reach bounds what any gist in the
input-embedding space can do for this frozen base at this layout: a GistNet that maps
blocks to embeddings can match it at best (up to the optimiser's reach).

Library code: no printing; a progress bar only when asked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcjax import scoring
from mcjax.config import GistConfig, LlamaConfig
from mcjax.eval import metrics
from mcjax.eval.tasks import LayoutSpec, batches_of
from mcjax.gist import embedding_rms
from mcjax.statistics import mean_stderr

__all__ = ["INITS", "FITS", "CeilingConfig", "CeilingResult", "init_vectors", "optimize_ceiling",
           "ceiling_section", "CEILING_NOTE"]

CEILING_NOTE = ("free vectors in the gist slots, optimised per window (Adam on KL(full ‖ "
                "compressed), init: mean-pooled token embeddings of each block, or the "
                "GistNet's gists), fitted on the H continuation targets themselves "
                "(fit=continuation: an oracle that may overfit them) or on the raw-tail "
                "targets before them only (fit=tail: the continuation held out); ΔNLL@H of "
                "the optimised vectors on the H continuation; bounds what an embedding-space "
                "gist can reach with this frozen base at this layout")


INITS = ("mean_pool", "gistnet")
FITS = ("continuation", "tail")


@dataclasses.dataclass(frozen=True)
class CeilingConfig:
    steps: int = 300
    # Adam step size in units of the base model's token-embedding RMS (gists live at that
    # scale: an absolute rate would mean different things for different bases).
    learning_rate: float = 0.1
    final_lr_fraction: float = 0.1  # cosine decay from learning_rate to this fraction
    log_every: int = 10  # KL / NLL curve points (mean over windows)
    init: str = "mean_pool"  # start vectors: "mean_pool" | "gistnet" (needs gist params)
    # which targets the KL is fitted on: "continuation" (the scored ones) | "tail" (the raw
    # tail before them; the continuation is then held out)
    fit: str = "continuation"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"ceiling steps must be >= 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"ceiling learning rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError("final_lr_fraction must lie in [0, 1]")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if self.init not in INITS:
            raise ValueError(f"ceiling init must be one of {INITS}, got {self.init!r}")
        if self.fit not in FITS:
            raise ValueError(f"ceiling fit must be one of {FITS}, got {self.fit!r}")


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, steps: int, final_fraction: float) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=final_fraction))


def init_vectors(base_params, tokens: jax.Array, layout: scoring.GistLayout, *,
                 base_cfg: LlamaConfig | None = None, gist_params=None,
                 gist_cfg: GistConfig | None = None) -> jax.Array:
    """[B, G, D] start: the mean-pool baseline's gists (mean token embedding per block), or
    with `gist_params` the GistNet's gists of the window (its inputs as in training)."""
    fn, children = scoring.gist_inputs("mean_pool" if gist_params is None else "gistnet",
                                       base_params, base_cfg, gist_params, gist_cfg,
                                       tokens[:, : layout.raw_start])
    return scoring.make_gists(fn, children, layout).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("base_cfg", "layout", "gist_cfg", "dense"))
def _reference(base_params, tokens, gist_params=None, *, base_cfg: LlamaConfig,
               layout: scoring.GistLayout, gist_cfg: GistConfig | None = None,
               dense: bool = False):
    """Teacher log-probs [B, n, V] (n: H, or every raw-tail target with `dense`), per-window
    NLL [B] of full context and truncation on the H continuation, truncation's KL to the
    teacher there [B], and the start vectors."""
    H = layout.horizon
    full_nll, full_logp = scoring.full_context_nll(base_params, base_cfg, tokens, layout, dense)
    trunc_nll, trunc_logp = scoring.substitution_nll_from_gists(base_params, base_cfg, tokens,
                                                                layout, None, dense=dense)
    trunc_kl = scoring.kl_to_teacher(full_logp[:, -H:], trunc_logp[:, -H:]).mean(-1)
    return (full_logp, full_nll[:, -H:].mean(-1), trunc_nll[:, -H:].mean(-1), trunc_kl,
            init_vectors(base_params, tokens, layout, base_cfg=base_cfg,
                         gist_params=gist_params, gist_cfg=gist_cfg))


def _kl_and_nll(vectors, base_params, tokens, teacher_logp, base_cfg, layout, fit):
    """(KL fitted [B], KL on the H continuation [B], NLL on it [B]); with fit="tail" the
    fitted KL covers the raw-tail targets before the continuation only."""
    H, tail = layout.horizon, fit == "tail"
    nll, logp = scoring.substitution_nll_from_gists(base_params, base_cfg, tokens, layout,
                                                    vectors, dense=tail)
    kl = scoring.kl_to_teacher(teacher_logp, logp)  # [B, n]
    kl_cont = kl[:, -H:].mean(-1)
    return (kl[:, :-H].mean(-1) if tail else kl_cont), kl_cont, nll[:, -H:].mean(-1)


@functools.partial(jax.jit, static_argnames=("base_cfg", "layout", "opt", "fit"))
def _step(vectors, opt_state, base_params, tokens, teacher_logp, *, base_cfg, layout, opt,
          fit):
    """One Adam step on every window's vectors; continuation KL [B] and NLL [B] before it."""
    optimizer = _optimizer(*opt)

    def loss(v):
        fitted, kl, nll = _kl_and_nll(v, jax.lax.stop_gradient(base_params), tokens,
                                      teacher_logp, base_cfg, layout, fit)
        return fitted.sum(), (kl, nll)  # sum: every window's own mean KL, independently

    grads, (kl, nll) = jax.grad(loss, has_aux=True)(vectors)
    updates, opt_state = optimizer.update(grads, opt_state, vectors)
    return optax.apply_updates(vectors, updates), opt_state, kl, nll


@functools.partial(jax.jit, static_argnames=("base_cfg", "layout", "fit"))
def _evaluate(vectors, base_params, tokens, teacher_logp, *, base_cfg, layout, fit):
    return _kl_and_nll(vectors, base_params, tokens, teacher_logp, base_cfg, layout, fit)[1:]


@dataclasses.dataclass
class CeilingResult:
    """Per-window results of one layout's ceiling ([N] arrays unless noted)."""

    layout: LayoutSpec
    config: CeilingConfig
    learning_rate_abs: float  # the Adam step size used (learning_rate x embedding RMS)
    nll_full: np.ndarray
    nll_truncation: np.ndarray
    nll_init: np.ndarray  # start vectors (mean_pool baseline, or the GistNet's gists)
    nll_ceiling: np.ndarray  # the optimised vectors
    kl_init: np.ndarray
    kl_ceiling: np.ndarray
    kl_truncation: np.ndarray  # KL(full ‖ truncated): the reference without any gist
    curve_steps: np.ndarray  # [C] steps at which the curve was recorded
    kl_curve: np.ndarray  # [C, N] KL before each recorded step
    nll_curve: np.ndarray  # [C, N]
    vector_rms: np.ndarray  # [N] RMS of the optimised vectors

    def arrays(self) -> dict[str, np.ndarray]:
        name = self.layout.name
        return {f"{name}/{k}": getattr(self, k) for k in (
            "nll_full", "nll_truncation", "nll_init", "nll_ceiling", "kl_init", "kl_ceiling",
            "kl_truncation", "curve_steps", "kl_curve", "nll_curve", "vector_rms")}


def optimize_ceiling(base_params, base_cfg: LlamaConfig, windows: np.ndarray,
                     spec: LayoutSpec, config: CeilingConfig = CeilingConfig(), *,
                     batch_size: int = 8, progress: bool = False, gist_params=None,
                     gist_cfg: GistConfig | None = None) -> CeilingResult:
    """Optimise free gist-slot vectors for every window [N, S] at one layout (batches of
    `batch_size`; the last one padded with copies, dropped after). `config.init="gistnet"`
    starts from the gists of `gist_params` (with `gist_cfg`)."""
    from tqdm.auto import tqdm

    layout = spec.layout
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < layout.window_len:
        raise ValueError(f"windows must be [N, >= {layout.window_len}], got {windows.shape}")
    if layout.num_gists == 0:
        raise ValueError(f"layout {spec.name} has no gist slots to optimise")
    if config.fit == "tail" and layout.scored(True) <= layout.horizon:
        raise ValueError(f"layout {spec.name} has no raw-tail targets before the "
                         f"continuation to fit")
    if config.init == "gistnet" and (gist_params is None or gist_cfg is None):
        raise ValueError('ceiling init "gistnet" needs gist_params and gist_cfg')
    start_params = gist_params if config.init == "gistnet" else None
    start_cfg = gist_cfg if config.init == "gistnet" else None
    lr = float(config.learning_rate * embedding_rms(base_params))
    opt = (lr, config.steps, config.final_lr_fraction)
    optimizer = _optimizer(*opt)
    log_at = sorted(set(range(0, config.steps, config.log_every)) | {config.steps - 1})
    out: dict[str, list] = {k: [] for k in ("full", "trunc", "init", "ceil", "kl0", "kl1",
                                            "klt", "klc", "nllc", "rms")}
    batches = batches_of(windows, batch_size)
    bar = tqdm(total=len(batches) * config.steps, desc=f"ceiling {spec.name}",
               disable=not progress)
    for batch, real in batches:
        tokens = jnp.asarray(batch)
        teacher, nll_full, nll_trunc, kl_trunc, vectors = _reference(
            base_params, tokens, start_params, base_cfg=base_cfg, layout=layout,
            gist_cfg=start_cfg, dense=config.fit == "tail")
        opt_state = optimizer.init(vectors)
        kl_c, nll_c = [], []
        for step in range(config.steps):
            vectors, opt_state, kl, nll = _step(vectors, opt_state, base_params, tokens,
                                                teacher, base_cfg=base_cfg, layout=layout,
                                                opt=opt, fit=config.fit)
            if step == 0:
                out["kl0"].append(np.asarray(kl)[:real])
                out["init"].append(np.asarray(nll)[:real])
            if step in log_at:
                kl_c.append(np.asarray(kl)[:real])
                nll_c.append(np.asarray(nll)[:real])
            bar.update(1)
        kl, nll = _evaluate(vectors, base_params, tokens, teacher, base_cfg=base_cfg,
                            layout=layout, fit=config.fit)
        out["kl1"].append(np.asarray(kl)[:real])
        out["ceil"].append(np.asarray(nll)[:real])
        out["full"].append(np.asarray(nll_full)[:real])
        out["trunc"].append(np.asarray(nll_trunc)[:real])
        out["klt"].append(np.asarray(kl_trunc)[:real])
        out["klc"].append(np.stack(kl_c))
        out["nllc"].append(np.stack(nll_c))
        out["rms"].append(np.sqrt(np.mean(np.square(np.asarray(vectors)), axis=(1, 2)))[:real])
    bar.close()
    cat = lambda k, axis=0: np.concatenate(out[k], axis=axis).astype(np.float32)  # noqa: E731
    return CeilingResult(
        layout=spec, config=config, learning_rate_abs=lr, nll_full=cat("full"),
        nll_truncation=cat("trunc"), nll_init=cat("init"), nll_ceiling=cat("ceil"),
        kl_init=cat("kl0"), kl_ceiling=cat("kl1"), kl_truncation=cat("klt"),
        curve_steps=np.asarray(log_at, np.int32),
        kl_curve=cat("klc", 1), nll_curve=cat("nllc", 1), vector_rms=cat("rms"))


def ceiling_section(results: Sequence[CeilingResult], *, embedding_rms_value: float | None = None
                    ) -> dict[str, Any]:
    """The "ceiling" results section: per layout, ΔNLL@H of the optimised vectors and of
    their mean-pool start, each paired against truncation (± SE, gap recovered), the KL
    at start and end, and the mean KL / NLL curve."""
    rows = []
    for r in results:
        spec = r.layout
        ceil = metrics.paired_vs_truncation(r.nll_ceiling, r.nll_truncation, r.nll_full)
        init = metrics.paired_vs_truncation(r.nll_init, r.nll_truncation, r.nll_full)
        rows.append({
            **spec.describe(), "layout": spec.name, "n": int(r.nll_full.size),
            "steps": r.config.steps, "init": r.config.init, "fit": r.config.fit,
            "learning_rate": r.config.learning_rate,
            "learning_rate_abs": r.learning_rate_abs,
            "final_lr_fraction": r.config.final_lr_fraction,
            "nll_full": float(r.nll_full.mean()),
            "ceiling": ceil, "start": init,
            "ceiling_minus_start": mean_stderr(r.nll_ceiling - r.nll_init),
            "kl_start": mean_stderr(r.kl_init),
            "kl_ceiling": mean_stderr(r.kl_ceiling),
            "kl_truncation": mean_stderr(r.kl_truncation),
            "windows_improved": int(np.sum(r.nll_ceiling < r.nll_init)),
            "vector_rms": float(r.vector_rms.mean()),
            "curve": {"steps": r.curve_steps.tolist(),
                      "kl": r.kl_curve.mean(axis=1).tolist(),
                      "nll": r.nll_curve.mean(axis=1).tolist()}})
    return {"note": CEILING_NOTE, "paired_note": metrics.PAIRED_NOTE,
            "embedding_rms": embedding_rms_value, "layouts": rows}
