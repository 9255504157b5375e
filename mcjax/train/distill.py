"""LensNet v2 by distillation (SPEC §2.5, §2.8 item 2; issue "focus that finds what the
question needs"): LensNet learns the retrieval policy's slot scores, corrected by the
synthetic task's ground truth.

Data (`distill_states`): for a history (a passkey prompt over real text, or plain text) the
tree is built as the runtime builds it (GistNet gists, read-pass keys); the retrieval
policy scores every block against the newest tokens' queries (`mcjax.retrieval`). The
*teacher* block scores are those, with the block(s) holding the needle (when there is one)
raised to 1.0: (a) distillation of retrieval focus and (b) the synthetic task's label —
"the block holding the answer must be expanded" — in one target, computed by the one
`retrieval.slot_scores` rule. Starting from the initial layout, the WC follows the teacher
through the allocator for a few rounds (the states focus passes through before an answer),
with a random-score round now and then (states the teacher would not visit). Every state
records what LensNet v2 sees — slot embeddings, WC, tail gists, the question's hidden
states, the slots' retrieval features — and the teacher's slot scores.

Training (`DistillBatch`, `distill_loss`): weighted squared error between LensNet's
legality-masked scores and the teacher's on valid slots (relevant slots weigh more: a few
of ~500); metrics say how often LensNet's best expand candidate is the teacher's and how
often the needle's slot clears tau_expand. It runs through the one training loop
(`mcjax.train.loop.train_distill`: `steps.DistillStep` on `StateBatches`, orbax resume,
metrics.jsonl and TensorBoard as every training).

States are host numpy dicts (`STATE_FIELDS`), saved as npz shards by the CLI
(`experiments/distill_lens.py`), so data generation (the base model's read passes) and
training (LensNet only) run separately and resume.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import focus, lens, retrieval
from mcjax import working_context as wcm
from mcjax.config import ExperimentConfig, LensConfig, MCConfig

__all__ = ["STATE_FIELDS", "HistoryConditioning", "history_conditioning", "teacher_blocks",
           "distill_states", "stack_states", "DistillBatch", "batch_from_states",
           "distill_scores", "distill_loss", "distill_metrics", "StateBatches", "eval_batches",
           "mean_metrics"]

# per-state arrays; W = w_max, D = slot-embedding width, Q = lens.query_tokens
STATE_FIELDS = ("slot_embeds",  # [W, D] float16
                "level", "node", "valid", "edit_step", "edit_dir",  # [W] the WC
                "num_tokens", "step",  # [] the WC
                "tail_embeds", "tail_level", "tail_valid",  # [Nt, D], [Nt], [Nt]
                "query_hidden", "query_valid",  # [Q, D], [Q]
                "slot_retrieval",  # [W, 2] float32
                "target",  # [W] float32 teacher slot scores (legality-masked)
                "needle")  # [W] bool: the slot's span holds a needle block
RELEVANT_WEIGHT = 8.0  # loss weight of slots the teacher scores > 0 (vs 1 for the rest)


@dataclasses.dataclass(frozen=True)
class HistoryConditioning:
    """Per history: the question's read and the retrieval relevance of every block."""

    rel: jax.Array  # [C1] relevance z-scores (-inf where not scoreable)
    blocks: jax.Array  # [C1] retrieval block scores
    query_hidden: jax.Array  # [Q, D]
    query_valid: jax.Array  # [Q]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _conditioning(base_params, view, cfg: ExperimentConfig):
    lc = cfg.lens
    out = retrieval.stream_conditioning(base_params, cfg.base_config, cfg.retrieval, cfg.mc,
                                        view.tokens, view.keys, view.counts,
                                        hidden_layer=lc.query_layer,
                                        hidden_tokens=lc.query_tokens)
    return out["rel"], out["blocks"], out["hidden"], out["hidden_valid"]


def history_conditioning(base_params, view, cfg: ExperimentConfig) -> HistoryConditioning:
    """What the refocus computes once per stream for LensNet v2 (as the runtime does)."""
    if not cfg.lens.query_tokens:
        raise ValueError("distillation trains LensNet v2: cfg.lens.query_tokens must be > 0")
    return HistoryConditioning(*_conditioning(base_params, view, cfg))


def teacher_blocks(blocks: jax.Array, needle_blocks) -> jax.Array:
    """Retrieval block scores with the needle's blocks raised to 1.0 (the task's label)."""
    idx = np.asarray(needle_blocks, np.int64)
    if idx.size == 0:
        return blocks
    return blocks.at[jnp.asarray(idx)].set(1.0)


@functools.partial(jax.jit, static_argnames=("mc",))
def _state_arrays(wc, view, base_params, rel, blocks, teacher, needle_blocks_mask, mc):
    emb, _, _ = wcm.materialize(wc, view, base_params, mc)
    tail = lens.tail_gists(view, mc)
    feats = retrieval.slot_retrieval_features(wc, rel, blocks, mc)
    target = retrieval.slot_scores(wc, teacher, mc)
    needle = retrieval.span_max(wc, needle_blocks_mask.astype(jnp.float32), mc) > 0
    return emb, tail, feats, target, needle


@functools.partial(jax.jit, static_argnames=("mc",))
def _step(wc, scores, mc):
    return focus.allocate(wc, scores, mc)


def distill_states(base_params, view, cfg: ExperimentConfig, needle_blocks, *,
                   rounds: int, rng: np.random.Generator, explore: float = 0.25
                   ) -> list[dict[str, np.ndarray]]:
    """The training states of one history (module docstring). `view`: the history's tree
    view (with keys); `needle_blocks`: LOD1 block indices holding the needle (empty for
    plain text); `rounds`: allocator rounds after the initial layout (states recorded:
    rounds + 1); `explore`: chance that a round moves by random scores instead of the
    teacher's."""
    mc = cfg.mc
    cond = history_conditioning(base_params, view, cfg)
    teacher = teacher_blocks(cond.blocks, needle_blocks)
    mask = np.zeros(cond.blocks.shape[0], bool)
    mask[np.asarray(needle_blocks, np.int64)] = True
    num_tokens = int(view.counts[0])
    wc = wcm.initial_layout(num_tokens, mc)
    out = []
    for r in range(rounds + 1):
        emb, tail, feats, target, needle = _state_arrays(
            wc, view, base_params, cond.rel, cond.blocks, teacher, jnp.asarray(mask), mc)
        out.append({
            "slot_embeds": np.asarray(emb, np.float16),
            "level": np.asarray(wc.level), "node": np.asarray(wc.node),
            "valid": np.asarray(wc.valid), "edit_step": np.asarray(wc.edit_step),
            "edit_dir": np.asarray(wc.edit_dir), "num_tokens": np.asarray(wc.num_tokens),
            "step": np.asarray(wc.step),
            "tail_embeds": np.asarray(tail.embeds, np.float16),
            "tail_level": np.asarray(tail.level), "tail_valid": np.asarray(tail.valid),
            "query_hidden": np.asarray(cond.query_hidden, np.float16),
            "query_valid": np.asarray(cond.query_valid),
            "slot_retrieval": np.asarray(feats, np.float32),
            "target": np.asarray(target, np.float32), "needle": np.asarray(needle)})
        if r == rounds:
            break
        moved, tries = False, 0
        while not moved and tries < 4:  # each recorded state differs from the last
            use_teacher = tries == 0 and rng.random() >= explore
            scores = target
            if not use_teacher:  # a state the teacher would not visit
                u = rng.uniform(-1.0, 1.0, target.shape).astype(np.float32)
                scores = lens.mask_illegal(jnp.asarray(u), wc, mc)
            new, _ = _step(wc, scores, mc)
            moved = bool(np.any(np.asarray(new.level) != np.asarray(wc.level))
                         | np.any(np.asarray(new.node) != np.asarray(wc.node)))
            wc, tries = new, tries + 1
        if not moved:
            break
    return out


def stack_states(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A list of states → one dict of arrays with a leading state axis."""
    missing = [f for f in STATE_FIELDS if any(f not in s for s in states)]
    if missing:
        raise ValueError(f"states lack fields {missing}")
    return {f: np.stack([s[f] for s in states]) for f in STATE_FIELDS}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillBatch:
    """A device batch of states (leading axis B)."""

    slot_embeds: jax.Array
    wc: wcm.WorkingContext
    tail: lens.TailGists
    query: lens.QueryTokens
    slot_retrieval: jax.Array
    target: jax.Array
    needle: jax.Array


def batch_from_states(arrays: dict[str, np.ndarray], idx: np.ndarray | None = None
                      ) -> DistillBatch:
    """Rows `idx` (default all) of stacked states as a `DistillBatch`."""
    a = {k: (v if idx is None else v[idx]) for k, v in arrays.items()}
    wc = wcm.WorkingContext(level=jnp.asarray(a["level"]), node=jnp.asarray(a["node"]),
                            valid=jnp.asarray(a["valid"]),
                            edit_step=jnp.asarray(a["edit_step"]),
                            edit_dir=jnp.asarray(a["edit_dir"]),
                            num_tokens=jnp.asarray(a["num_tokens"]),
                            step=jnp.asarray(a["step"]))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return DistillBatch(
        slot_embeds=f32(a["slot_embeds"]), wc=wc,
        tail=lens.TailGists(embeds=f32(a["tail_embeds"]), level=jnp.asarray(a["tail_level"]),
                            valid=jnp.asarray(a["tail_valid"])),
        query=lens.QueryTokens(hidden=f32(a["query_hidden"]),
                               valid=jnp.asarray(a["query_valid"])),
        slot_retrieval=f32(a["slot_retrieval"]), target=f32(a["target"]),
        needle=jnp.asarray(a["needle"]))


def distill_scores(lens_params, batch: DistillBatch, lens_cfg: LensConfig, mc: MCConfig
                   ) -> jax.Array:
    """LensNet v2's legality-masked scores [B, W] of a batch."""
    feats = batch.slot_retrieval if lens_cfg.retrieval_features else None
    query = batch.query if lens_cfg.query_tokens else None
    return lens.LensNet(lens_cfg, mc).apply({"params": lens_params}, batch.slot_embeds,
                                            batch.wc, batch.tail, query, feats)


def distill_metrics(scores: jax.Array, batch: DistillBatch, mc: MCConfig) -> dict:
    """Per batch: weighted MSE; `best_agree` — among states whose teacher wants some slot
    expanded, how often LensNet's highest-scoring slot is one the teacher scores highest;
    `needle_expand` — among states with the needle inside a gist, how often that gist
    scores above tau_expand; `false_expand` — slots LensNet would expand that the teacher
    scores <= 0, per state."""
    t, valid = batch.target, batch.wc.valid
    w = jnp.where(valid, jnp.where(t > 0, RELEVANT_WEIGHT, 1.0), 0.0)
    mse = jnp.sum(w * (scores - t) ** 2) / jnp.maximum(jnp.sum(w), 1.0)
    want = jnp.max(jnp.where(valid, t, -jnp.inf), -1) > mc.tau_expand
    mine = jnp.argmax(jnp.where(valid, scores, -jnp.inf), -1)
    t_at = jnp.take_along_axis(t, mine[:, None], -1)[:, 0]
    best = t_at >= jnp.max(jnp.where(valid, t, -jnp.inf), -1) - 1e-6
    gist_needle = batch.needle & (batch.wc.level >= 1) & valid
    has = jnp.any(gist_needle, -1)
    needle_ok = jnp.any(gist_needle & (scores > mc.tau_expand), -1)
    false_exp = jnp.sum(valid & (scores > mc.tau_expand) & (t <= 0), -1)
    n = lambda m: jnp.maximum(jnp.sum(m), 1)  # noqa: E731
    return {"mse": mse,
            "best_agree": jnp.sum(best & want) / n(want), "n_want": jnp.sum(want),
            "needle_expand": jnp.sum(needle_ok & has) / n(has), "n_needle": jnp.sum(has),
            "false_expand": jnp.mean(false_exp.astype(jnp.float32))}


def distill_loss(lens_params, batch: DistillBatch, lens_cfg: LensConfig, mc: MCConfig):
    """(weighted squared error, metrics) of LensNet v2 against the teacher's scores."""
    scores = distill_scores(lens_params, batch, lens_cfg, mc)
    m = distill_metrics(scores, batch, mc)
    return m["mse"], m


@dataclasses.dataclass
class StateBatches:
    """Endless shuffled `DistillBatch`es of exactly `batch_size` states over stacked state
    arrays: each epoch visits every row once in a permutation drawn from (seed, epoch) (fewer
    rows than a batch repeat). `state()` / `restore()` carry the position through
    checkpoints, as `data.WindowIterator` does, so a resumed run sees the same batches."""

    arrays: dict[str, np.ndarray]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self):
        self._rows = len(self.arrays["target"])
        if self._rows < 1:
            raise ValueError("no training states")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self._rows)
        return np.resize(perm, self.batch_size) if self._rows < self.batch_size else perm

    def next_indices(self) -> np.ndarray:
        if self.cursor + self.batch_size > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor: self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx

    def __iter__(self):
        return self

    def __next__(self) -> DistillBatch:
        return batch_from_states(self.arrays, self.next_indices())

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[DistillBatch]:
    """Every row of held-out state arrays in order, in batches of exactly `batch_size` (one
    compiled shape; the last batch is filled up with the first rows)."""
    n = len(arrays["target"])
    idx = np.resize(np.arange(n), -(-n // batch_size) * batch_size)
    return [batch_from_states(arrays, idx[i: i + batch_size])
            for i in range(0, len(idx), batch_size)]


def mean_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Average of per-batch metrics, ratios weighted by their counts."""
    out: dict[str, float] = {}
    for key, count in (("best_agree", "n_want"), ("needle_expand", "n_needle")):
        n = sum(float(r[count]) for r in rows)
        out[key] = sum(float(r[key]) * float(r[count]) for r in rows) / max(n, 1.0)
        out[count] = n
    for key in ("mse", "false_expand"):
        out[key] = float(np.mean([float(r[key]) for r in rows]))
    return out
