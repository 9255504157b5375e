"""`Session`: the host wrapper over the runtime's pure programs (package docstring) — text and
token input, the trees, view uploads, when to refocus, telemetry, save and load."""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mcjax import nets
from mcjax import working_context as wcm
from mcjax.assets import flatten_params, unflatten_params
from mcjax.base import model as base
from mcjax.base.convert import fsync_dir
from mcjax.base.model import InputError, KVCache
from mcjax.checks import as_int
from mcjax.checkpoint import tree_fingerprint
from mcjax.config import (ConfigError, ExperimentConfig, LlamaConfig, config_from_json,
                          config_to_json)
from mcjax.errors import CheckpointError, CheckpointMismatchError
from mcjax.runtime import persist
from mcjax.runtime.programs import programs
from mcjax.runtime.state import (DEFAULT_MAX_TOKENS, empty_view, initial_layouts,
                                 initial_state, make_plan, pending_base_position)
from mcjax.runtime.telemetry import RefocusEvent, event_from
from mcjax.scoring import score_continuation, token_logprobs
from mcjax.tree import (BlockGister, MegaContextTree, StoreError, append_to_trees,
                        copy_rows, view_update)

__all__ = ["Session"]


@functools.partial(jax.jit, static_argnames=("config",))
def _cache_logprobs(params, cache: KVCache, tokens, positions, mask, index, *,
                    config: LlamaConfig):
    """log p(tokens[:, i + 1] | context, tokens[:, :i + 1]) [B, T - 1] with the tokens
    written after `index` slots of `cache` (not donated: the caller's cache is unchanged)."""
    logp = score_continuation(params, config, tokens, positions, mask, cache=cache,
                              cache_index=index)
    return jnp.where(mask[:, 1:], token_logprobs(logp, tokens[:, 1:]), 0.0)


def _base_parts(base_model) -> tuple:
    """(LlamaConfig, params, encode, decode) of a `BaseModel` (encode/decode: its tokenizer's,
    when it has one) or of a `(LlamaConfig, params)` pair (no tokenizer)."""
    if hasattr(base_model, "config") and hasattr(base_model, "params"):
        return (base_model.config, base_model.params, getattr(base_model, "encode", None),
                getattr(base_model, "decode", None))
    try:
        llama, params = base_model
    except (TypeError, ValueError):
        raise TypeError("base must be a BaseModel or a (LlamaConfig, params) pair") from None
    return llama, params, None, None


class Session:
    """A batch of MegaContext streams over one frozen base model (module docstring).

    base: a `BaseModel` (gives text encoding) or `(LlamaConfig, params)`. gist_params /
    lens_params: trained params, or None: the shipped params when they fit `cfg`
    (`mcjax.nets.default_params`, provenance "shipped"), else — and with
    `untrained=True` always — the untrained networks the trainers start from
    (`self.untrained` names them). cfg: the experiment config (`mc`, `gist`, `lens`).
    max_tokens: per-stream history capacity (fixes the device view's shapes).
    collapse_headroom: slots freed at once when the next block would not fit (default
    w_max/8 in whole blocks; 0 = collapse only as needed): trades up to that much budget
    for re-prefilling only the new tokens on most refocuses (see `programs.collapse_ahead`).
    prefill_chunk: slots per bulk re-prefill chunk (default: the largest K·2^i <= 256 that
    divides w_max); bigger chunks use the hardware better, K-slot chunks trim the ends.
    focus_policy: where refocus scores come from — "lens" (LensNet, the default; LensNet v2,
    `cfg.lens.query_tokens` / `retrieval_features`, also reads the newest tokens and, with
    retrieval features, makes the trees keep read-pass keys, and settles like
    "retrieval"), or the
    baselines "random" (uniform scores, deterministic given `focus_seed`, new ones every
    refocus) and "recency" (newer spans toward expand, older toward collapse); both are
    legality-masked like LensNet's and go through the same allocator and budget logic; or
    "retrieval" (training-free and query-aware, `mcjax.retrieval`: the trees also keep
    read-pass keys per block, the newest tokens' queries score them, and new input is
    refocus after new input settles: up to `cfg.retrieval.settle_rounds` more allocator
    rounds while focus still moves, inside the one refocus program, then one re-prefill).
    kv_reuse: "exact" (the default) re-prefills every slot from a refocus's first change on,
    so the cache equals a fresh prefill of the WC. "approx" keeps the cache entries of the
    slots whose entry did not change — moved to their new slot, keys re-rotated to their new
    position — and recomputes only the K-slot chunks holding new entries (an expansion's
    tokens, a collapse's gist, fed tokens) plus each changed stream's newest chunk; kept
    entries were computed over the old context, so the cache only approximates the WC's
    (CacheBlend, arXiv 2405.16444). It falls back to exact when that recomputes no more.
    `results/kv_reuse/` measures its cost in NLL and its speed.
    decode_focus: when focus acts while generating — "every" refocus after K decoded tokens
    (the default), or "on_collapse": only in those that must make room anyway (a budget or
    headroom collapse, which re-prefills from near the front), so the refocuses between
    them only append (no re-prefill, no scoring). Refocuses after input always act
    (and settle). With `collapse_headroom` it sets how often a generating stream re-prefills
    (every headroom/K blocks); `results/decode_focus/` measures its NLL cost and speed.
    """

    def __init__(self, base_model, gist_params, lens_params, cfg: ExperimentConfig, *,
                 batch_size: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS,
                 mesh: Mesh | None = None, debug_invariants: bool = False,
                 collapse_headroom: int | None = None, prefill_chunk: int | None = None,
                 gist_batch: int | None = None, pad_id: int = 0,
                 on_event: Callable[[RefocusEvent], None] | None = None,
                 max_events: int = 100_000, provenance: dict | None = None,
                 focus_policy: str = "lens", focus_seed: int = 0, untrained: bool = False,
                 kv_reuse: str = "exact", decode_focus: str = "every"):
        llama, params, self._encode, self.decode_text = _base_parts(base_model)
        # every setting of the programs, checked before any work
        self._plan = make_plan(llama, cfg, batch_size=batch_size, max_tokens=max_tokens,
                               collapse_headroom=collapse_headroom,
                               prefill_chunk=prefill_chunk, pad_id=pad_id,
                               focus_policy=focus_policy, kv_reuse=kv_reuse,
                               decode_focus=decode_focus)
        if cfg.base_config is None:
            cfg = dataclasses.replace(cfg, base_config=llama)
        # refused, not truncated
        max_events = as_int(max_events, "max_events", minimum=1, exc=ConfigError)
        focus_seed = as_int(focus_seed, "focus_seed", minimum=0, exc=ConfigError)
        self.cfg, self.mc, self.llama = cfg, cfg.mc, llama
        self.batch_size, self.max_tokens = self._plan.batch_size, self._plan.max_tokens
        self.debug_invariants = debug_invariants
        self.mesh = mesh
        self.on_event = on_event
        self.events: collections.deque[RefocusEvent] = collections.deque(maxlen=max_events)
        self.focus_policy, self.focus_seed = focus_policy, focus_seed
        gist_params, lens_params = self._resolve_networks(gist_params, lens_params, params,
                                                          provenance, untrained)
        self._programs = programs(self._plan, mesh)
        self._place_params(params, lens_params)
        self._build_trees(gist_params, gist_batch)
        self._build_state()
        # what `save` writes so that `load` rebuilds this session
        self._nets = {"gist": gist_params, "lens": lens_params}
        self._settings = dict(batch_size=self.batch_size, max_tokens=self.max_tokens,
                              collapse_headroom=self._plan.headroom,
                              prefill_chunk=self._plan.prefill_chunk, gist_batch=gist_batch,
                              pad_id=self._plan.pad_id, max_events=max_events,
                              focus_policy=focus_policy, focus_seed=self.focus_seed,
                              kv_reuse=kv_reuse, decode_focus=decode_focus)

    def _resolve_networks(self, gist_params, lens_params, base_params, provenance: dict | None,
                          untrained: bool) -> tuple:
        """The (gist, lens) params the session runs with — given, shipped or untrained
        (`nets.default_params`) and checked against `self.cfg` — and where they come from
        (`self.provenance`, `self.untrained`)."""
        cfg, focus_policy = self.cfg, self.focus_policy
        self.provenance = dict(provenance or {})
        gist_params, lens_params, resolved = nets.default_params(
            cfg, gist_params, lens_params, base_params, untrained=untrained,
            focus_policy=focus_policy)
        self.provenance.update(resolved)
        for part in ("gist", "lens"):
            self.provenance.setdefault(part, {"source": "given"})
        self.provenance["focus_policy"] = (
            {"policy": focus_policy} if focus_policy == "lens"
            else {"policy": focus_policy, "seed": self.focus_seed, "lens": "not used"})
        # Which networks are untrained (their gists / focus decisions mean nothing yet); an
        # untrained LensNet does not count when a baseline policy replaces its scores.
        self.untrained: tuple[str, ...] = tuple(
            p for p in ("gist", "lens") if self.provenance[p]["source"] == "untrained"
            and (p == "gist" or focus_policy == "lens"))
        nets.check_params(gist_params, cfg, "gist", exc=ValueError)
        nets.check_params(lens_params, cfg, "lens", exc=ValueError)
        return gist_params, lens_params

    def _place_params(self, base_params, lens_params) -> None:
        """The programs' base and focus params on the device (sharded with a mesh). The
        refocus program's `focus_params` are LensNet's params for "lens", the seed for
        "random" (its key), unused by "recency" and "retrieval"."""
        if self.focus_policy == "random":
            lens_params = np.uint32(self.focus_seed % (1 << 32))
        sh = self._programs.shardings
        if sh is None:
            self._params = jax.device_put(base_params)
            self._focus_params = jax.device_put(lens_params)
        else:
            self._params = jax.device_put(base_params, sh["params"])
            self._focus_params = jax.device_put(lens_params, sh["rep"])

    def _build_trees(self, gist_params, gist_batch: int | None) -> None:
        """One empty in-memory tree per stream, over one read pass (GistNet's hidden input
        and, when the plan keeps them, the retrieval keys)."""
        cfg, K = self.cfg, self.mc.block_size
        self._block_keys = None
        if self._plan.keeps_keys:
            from mcjax.retrieval import BlockKeys

            self._block_keys = BlockKeys(cfg.retrieval, self.llama, K)
        self._gister = BlockGister.from_base(
            cfg.gist, gist_params, self._params, self.llama, block_size=K,
            gist_batch=gist_batch, retrieval=cfg.retrieval if self._plan.keeps_keys else None)
        self._trees = [MegaContextTree.in_memory(self.mc, self._gister,
                                                 view_capacity_tokens=self.max_tokens,
                                                 block_keys=self._block_keys)
                       for _ in range(self.batch_size)]
        # (width, dtype) of the read-pass key rows the view holds, when the trees keep keys
        self._key_rows = () if self._block_keys is None else (self._block_keys.width,
                                                              self._block_keys.dtype)

    def _build_state(self) -> None:
        """The device state of B streams with no history (empty WCs, cache and view), and
        its host-side bookkeeping."""
        B, L = self.batch_size, self.mc.num_levels
        self._state = self._put(initial_state(self._plan), "state")
        self._view = self._put(empty_view(self._plan, *self._key_rows), "view")
        self._empty_layout = self._put(self._layouts(np.zeros(B, bool)), "wc")
        self._no_streams = np.zeros(B, bool)
        self._view_synced = np.zeros((B, L + 1), np.int64)
        self._unsynced = np.zeros(B, np.int64)  # tree tokens not yet in the WC
        self._laid_out = np.zeros(B, bool)
        self._num_pending = 0  # host mirror of state.num_pending
        self._num_refocus = 0
        self._unread = None  # (t0, trigger, num_new, telemetry, timings) of a refocus whose
        # telemetry is not read yet (a decode refocus, read once the next block is dispatched)
        self._ingest_s = 0.0  # tree ingest time since the last refocus (feed side)
        self._base_fingerprint: str | None = None  # computed once, at the first save
        self._changes = 0  # bumped by every feed / force / flush / stream (see `stream`)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoints(cls, base_model, cfg: ExperimentConfig, *,
                         gist_checkpoint: str | os.PathLike | None = None,
                         lens_checkpoint: str | os.PathLike | None = None, **kwargs
                         ) -> "Session":
        """A session with GistNet / LensNet from training workdirs (None: the shipped
        GistNet when it fits `cfg`, else untrained; `untrained=True`: untrained).

        Without `gist_checkpoint`, a LensNet checkpoint's own GistNet is used when it has
        one (a `train_joint` run) or names one that exists (a `train_lens` run trained on a
        GistNet checkpoint or params file, or on an untrained one):
        `mcjax.nets.from_workdirs`, so that LensNet sees the gists it was trained on.
        """
        llama = base_model.config if hasattr(base_model, "config") else base_model[0]
        if cfg.base_config is None:
            cfg = dataclasses.replace(cfg, base_config=llama)
        found = nets.from_workdirs(
            cfg, base_model.params if hasattr(base_model, "params") else base_model[1],
            gist_workdir=gist_checkpoint, lens_workdir=lens_checkpoint)
        gist, lens_params = (found[p][0] if p in found else None for p in nets.PARTS)
        provenance = {p: found[p][1] for p in found}
        return cls(base_model, gist, lens_params, cfg, provenance=provenance, **kwargs)

    def _put(self, tree, kind: str):
        sh = self._programs.shardings
        return jax.device_put(tree) if sh is None else jax.device_put(tree, sh[kind])

    def _layouts(self, reset: np.ndarray) -> wcm.WorkingContext:
        """Batched host WC: the initial layout of each reset stream's history, else empty."""
        return initial_layouts(self._plan, [t.num_tokens for t in self._trees], reset)

    # ------------------------------------------------------------------ input

    @property
    def network_params(self) -> dict:
        """The params this session uses: {"gist": GistNet, "lens": LensNet (None when the
        focus policy needs none)}; `provenance` says where they came from."""
        return dict(self._nets)

    @property
    def num_tokens(self) -> np.ndarray:
        """[B] history length of each stream (fed and generated tokens)."""
        pending = self._pending_tokens() if self._num_pending else [[]] * self.batch_size
        return np.asarray([t.num_tokens + len(p) for t, p in zip(self._trees, pending)])

    def tree(self, stream: int = 0) -> MegaContextTree:
        return self._trees[stream]

    @property
    def read_pass(self) -> dict:
        """What the trees' one read pass has cost so far (all streams): "outputs" it reads,
        its "chunk" (tokens), "depth" (decoder layers per token read), "tokens_read", "forwards" (whole chunks
        and cached steps), and "layer_passes_per_token" = depth x tokens read / tokens in
        the trees' complete blocks (1 x depth when every token is read once; 0 when
        GistNet reads embeddings and no keys are kept)."""
        reader = self._gister.reader
        K = self.mc.block_size
        blocks = sum(len(t.stores[0]) // K for t in self._trees) * K
        if reader is None:
            return {"outputs": (), "chunk": None, "depth": 0, "tokens_read": 0,
                    "forwards": 0, "layer_passes_per_token": 0.0}
        return {"outputs": reader.outputs, "chunk": reader.chunk, "depth": reader.depth,
                "tokens_read": reader.tokens_read, "forwards": reader.calls,
                "layer_passes_per_token": reader.depth * reader.tokens_read / max(blocks, 1)}

    def _token_lists(self, inputs) -> list[np.ndarray]:
        B, V = self.batch_size, self.llama.vocab_size

        def one(x) -> np.ndarray:
            if isinstance(x, str):
                if self._encode is None:
                    raise InputError("text input needs a tokenizer: build the Session from a "
                                     "BaseModel, or feed token ids")
                x = self._encode(x)
            arr = np.asarray(x)
            if arr.size == 0:
                return np.zeros((0,), np.int64)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"a stream's input must be text or a 1-D sequence of integer "
                                 f"token ids, got shape {arr.shape} dtype {arr.dtype}")
            if arr.min() < 0 or arr.max() >= V:
                bad = int(arr.max()) if arr.max() >= V else int(arr.min())
                raise InputError(f"token id {bad} is outside the vocabulary [0, {V})")
            return arr.astype(np.int64)

        def ndim(x) -> int:
            try:
                return np.ndim(x)
            except ValueError:  # ragged nesting, e.g. [5, [6, 7]]
                raise InputError(f"input must be text, a 1-D sequence of token ids, or a "
                                 f"list of {B} of them (one per stream); got a mix of ids and "
                                 f"sequences: {str(inputs)[:60]}") from None

        per_stream = (isinstance(inputs, (list, tuple)) and len(inputs) > 0
                      and all(isinstance(x, str) or ndim(x) >= 1 for x in inputs))
        if per_stream is False and isinstance(inputs, (list, tuple)) and any(
                isinstance(x, str) or ndim(x) >= 1 for x in inputs):
            raise InputError(f"input mixes token ids with sequences or texts: give a 1-D "
                             f"sequence of ids, or a list of {B} texts / sequences (one per "
                             f"stream): {str(inputs)[:60]}")
        if not per_stream and not isinstance(inputs, str) and ndim(inputs) == 2:
            inputs, per_stream = list(np.asarray(inputs)), True
        if per_stream:
            if len(inputs) != B:
                raise InputError(f"got inputs for {len(inputs)} streams, this session has {B}")
            return [one(x) for x in inputs]
        if B != 1:
            raise InputError(f"this session has {B} streams: pass one input per stream (a "
                             f"list of {B} texts or token sequences)")
        return [one(inputs)]

    def _pending_tokens(self) -> list[np.ndarray]:
        """Per stream: the decoded tokens in pending slots (not yet in the trees)."""
        p, W = self._num_pending, self.mc.w_max
        tokens = np.asarray(self._state.pending)[:, :p]
        valid = np.asarray(self._state.cache.valid)[:, W:W + p]
        return [tokens[b][valid[b]].astype(np.int64) for b in range(self.batch_size)]

    def _check_room(self, extra: Sequence[int]) -> None:
        for b, (tree, n) in enumerate(zip(self._trees, extra)):
            total = tree.num_tokens + int(n)
            if total > self.max_tokens:
                raise wcm.CapacityError(
                    f"stream {b}: history would reach {total} tokens, more than this "
                    f"session's max_tokens={self.max_tokens} (the fixed capacity of its device "
                    f"tree view); create the Session with a larger max_tokens")
            wcm.check_capacity(total, self.mc)

    def feed(self, inputs) -> None:
        """Append input to the streams: text or token ids (one stream), or a list of B of
        them (an empty entry leaves that stream unchanged). Any length works — far beyond
        w_max too. The trees ingest it now; the WC and cache follow at the next
        `generate`/`sync`. Tokens decoded since the last refocus are kept in the history —
        for every stream, as the pending slots are shared: a feed to some streams also
        refocuses the others if they have pending tokens."""
        ids = self._token_lists(inputs)
        if sum(len(x) for x in ids) == 0:
            raise InputError("feed: empty input (no tokens for any stream)")
        self._changed()
        self._ingest(ids)

    def _ingest(self, ids: list[np.ndarray]) -> None:
        """Append the pending decoded tokens, then `ids`, to each stream's tree."""
        t0 = time.perf_counter()
        pending = self._pending_tokens() if self._num_pending else \
            [np.zeros((0,), np.int64)] * self.batch_size
        new = [np.concatenate([p, x]) for p, x in zip(pending, ids)]
        self._check_room([len(x) for x in new])
        append_to_trees(self._trees, new)  # one GistNet call per level for all streams
        self._unsynced += np.asarray([len(x) for x in new])
        self._num_pending = 0  # now in the trees; the next refocus clears the slots
        self._ingest_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Bring the WC up to date with the whole history, including the tokens decoded
        since the last refocus (one refocus). Unlike `sync`, this changes when later
        refocuses happen, so call it between turns, not between pieces of one generation."""
        if self._num_pending:
            self._changed()
            self._ingest([np.zeros((0,), np.int64)] * self.batch_size)
        self.sync()

    def sync(self) -> None:
        """Bring every WC and the cache up to date with the trees (one refocus)."""
        if not self._unsynced.any():
            return
        counts = np.asarray([t.num_tokens for t in self._trees])
        reset = ~self._laid_out & (counts > 0)
        num_new = np.where(reset, 0, self._unsynced)
        layout = self._put(self._layouts(reset), "wc") if reset.any() else self._empty_layout
        self._laid_out |= reset
        self._unsynced[:] = 0
        timings, self._ingest_s = {"ingest_s": self._ingest_s}, 0.0
        self._refocus(num_new, reset, layout, revive=(num_new > 0) | reset, trigger="input",
                      timings=timings)

    # ------------------------------------------------------------------ refocus

    def _upload_view(self) -> None:
        update = view_update(self._trees, self._view_synced)
        if update is None:
            return
        self._view = self._programs.write_view(self._view, *update)
        self._view_synced = update[4].astype(np.int64)

    def _refocus(self, num_new, reset, layout, *, revive, trigger: str, timings: dict,
                 defer: bool = False) -> RefocusEvent | None:
        """Dispatch one refocus. Its telemetry is read (and the event made) now, or with
        `defer` once the next decode block has been dispatched (`_read_telemetry`), so the
        device goes from refocus to decode without waiting for the host."""
        self._read_telemetry()
        t0 = time.perf_counter()
        self._upload_view()
        self._state, telemetry = self._programs.refocus(
            self._params, self._focus_params, self._state, self._view,
            np.asarray(num_new, np.int32), np.asarray(reset, bool), layout,
            np.asarray(revive, bool), np.bool_(trigger == "decode"))
        self._unread = (t0, trigger, np.asarray(num_new), telemetry, timings)
        # debug_invariants checks the state this refocus left, so it cannot wait for the
        # next decode block
        return None if defer and not self.debug_invariants else self._read_telemetry()

    def _read_telemetry(self) -> RefocusEvent | None:
        """Wait for the last dispatched refocus's telemetry and record its event (None when
        every refocus was recorded already)."""
        if self._unread is None:
            return None
        t0, trigger, num_new, telemetry, timings = self._unread
        self._unread = None
        telemetry = jax.device_get(telemetry)  # waits for that refocus
        timings = dict(timings, refocus_s=time.perf_counter() - t0)
        if telemetry["append_overflow"].any():
            b = int(np.argmax(telemetry["append_overflow"]))
            raise wcm.CapacityError(f"stream {b}: the working context could not absorb "
                                    f"{int(num_new[b])} new tokens: "
                                    + wcm.capacity_message(self._trees[b].num_tokens, self.mc))
        event = event_from(self._num_refocus, trigger, num_new, telemetry, self.mc, timings)
        self._num_refocus += 1
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        if self.debug_invariants:
            self._check()
        return event

    def _refocus_pending(self, timings: dict) -> None:
        """K tokens decoded: ingest them into the trees and dispatch a refocus, its
        telemetry read after the next decode block is dispatched (`_stream`)."""
        t0 = time.perf_counter()
        new = self._pending_tokens()
        append_to_trees(self._trees, new)
        timings = dict(timings, ingest_s=time.perf_counter() - t0)
        self._num_pending = 0
        self._refocus(np.asarray([len(x) for x in new]), self._no_streams, self._empty_layout,
                      revive=self._no_streams, trigger="decode", timings=timings, defer=True)

    def check(self, atol: float = 2e-3) -> None:
        """Check every WC invariant against the trees, and that the cache holds exactly the
        WC and the pending tokens: its keys/values equal (to `atol`, relative to their
        scale) a fresh prefill of the materialized WC followed by the pending tokens, and the
        next token is that reference's greedy prediction (raises
        `working_context.InvariantError`). Costs one prefill of every stream's WC. With
        `kv_reuse="approx"` the cache only approximates that prefill by design, so only the
        invariants and the cache's validity are checked."""
        emb, pos, valid = self.materialized()  # syncs
        self._check()
        if self._plan.kv_reuse == "approx":
            return
        W, K, p = self.mc.w_max, self.mc.block_size, self._num_pending
        state = self._state
        ref = base.init_cache(self.llama, self.batch_size, W + K)
        hidden, ref = base.prefill(self._params, self.llama, ref, embeds=emb, positions=pos,
                                   mask=valid, index=0, return_hidden=True)
        newest = np.asarray(state.wc.num_valid) - 1
        last = np.asarray(hidden)[np.arange(self.batch_size), np.maximum(newest, 0)]
        if p:
            live = np.asarray(state.cache.valid)[:, W:W + p]
            first = np.asarray(pending_base_position(self._plan, state.wc))
            hidden, ref = base.prefill(
                self._params, self.llama, ref, tokens=np.asarray(state.pending)[:, :p],
                positions=first[:, None] + np.arange(p)[None], mask=live, index=W,
                return_hidden=True)
            last = np.where(live[:, -1:], np.asarray(hidden)[:, -1], last)
        slots = np.concatenate([np.asarray(valid), np.asarray(state.cache.valid)[:, W:]], 1)
        for name, got, want in (("keys", state.cache.k, ref.k), ("values", state.cache.v, ref.v)):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            m = slots[None, :, :, None, None]
            err = np.max(np.abs(np.where(m, got - want, 0.0)))
            scale = max(1.0, float(np.max(np.abs(np.where(m, want, 0.0)))))
            if err > atol * scale:
                raise wcm.InvariantError(f"cached {name} differ from a fresh prefill of the "
                                         f"working context by {err:.3g} (scale {scale:.3g})")
        logits = base.logits_from_hidden(self._params, self.llama, jnp.asarray(last))
        want_next = np.asarray(jnp.argmax(logits, -1))
        has = (newest >= 0) & ~np.asarray(state.done)
        if (np.asarray(state.next_token)[has] != want_next[has]).any():
            raise wcm.InvariantError("next_token is not the greedy prediction of a fresh "
                                     "prefill of the working context")

    def materialized(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(slot embeddings [B, W, D], positions [B, W], validity [B, W]) of every stream's
        working context, from the session's own device view of the trees, after bringing
        the WCs up to date (`sync`): what the cache's first W slots were prefilled from."""
        self.sync()
        return jax.vmap(lambda wc, v: wcm.materialize(wc, v, self._params, self.mc))(
            self._state.wc, self._view)

    def _check(self) -> None:
        wc = jax.device_get(self._state.wc)
        counts = np.asarray([t.counts for t in self._trees])
        wcm.check_invariants(wc, counts, self.mc)
        W, p = self.mc.w_max, self._num_pending
        cache_valid = np.asarray(self._state.cache.valid)
        if not (cache_valid[:, :W] == wc.valid).all():
            raise wcm.InvariantError("cache validity differs from the working context's")
        if cache_valid[:, W + p:].any():
            raise wcm.InvariantError("cache slots past the pending tokens are valid")

    # ------------------------------------------------------------------ persistence

    def base_fingerprint(self) -> str:
        """A hash of the base model's weights (`mcjax.checkpoint.tree_fingerprint`, computed
        once per session where the params live): a save records it, `load` compares it."""
        if self._base_fingerprint is None:
            self._base_fingerprint = tree_fingerprint(self._params)
        return self._base_fingerprint

    def save(self, directory: str | os.PathLike) -> Path:
        """Persist the session under `directory` so that `Session.load` continues it
        bit-identically (same next tokens, same WCs): every stream's tree through the
        on-disk store, the whole `StreamState` (WC, KV cache, pending tokens, flags), the
        host-side counters, the config, the settings, the GistNet / LensNet params and the
        base model's fingerprint (`base_fingerprint`). Telemetry (`events`) is not saved.

        Exclusive: one save at a time per directory (`persist.save_lock`; a second writer,
        in this process or another, gets `persist.SaveLockedError` at once, naming the
        holder). Crash-safe: a save is written into a fresh `.incomplete-save-N`
        directory, checksummed (`SHA256SUMS`: every file's sha256), made durable, renamed
        to `save-N` and only then published by atomically replacing the `LATEST` pointer.
        A process killed at any point (SIGKILL included) leaves the previous save
        loadable. Only entries a save made (a save's name with its marker file inside)
        are ever removed: the older saves and leftovers of killed ones, after the
        publication, once no `load` is reading them (`persist.remove_older_saves`; else
        the next save removes them); anything else in `directory` is left alone.
        Returns the published save's directory."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, no permission, ...
            raise CheckpointError(f"cannot save into {directory}: {e.strerror or e}") from e
        if not directory.is_dir():
            raise CheckpointError(f"cannot save into {directory}: not a directory")
        fingerprint = self.base_fingerprint()
        with persist.save_lock(directory):
            final = self._save_locked(directory, fingerprint)
        # outside the writer lock (another save may start meanwhile: it numbers its own
        # directories above ours, and only lower numbers are removed here)
        persist.remove_older_saves(directory, final.name)
        return final

    def _save_locked(self, directory: Path, fingerprint: str) -> Path:
        numbers = [persist.save_number(p.name) for p in directory.iterdir()]
        n = max((k for k in numbers if k is not None), default=0) + 1
        tmp = directory / f".incomplete-save-{n}"
        tmp.mkdir()
        persist.write_durably(tmp / persist.MARKER, b"written by mcjax Session.save\n")
        for b, tree in enumerate(self._trees):
            # (no model_name: the header holds 32 bytes; session.json names the base)
            with MegaContextTree.create(tmp / f"tree-{b}", self.mc, self._gister,
                                        block_keys=self._block_keys) as dst:
                copy_rows(tree, dst)
        arrays = {"state/" + k: v for k, v in persist.keyed_leaves(self._state)[0].items()}
        for part, params in self._nets.items():
            arrays.update({f"{part}/{k}": v for k, v in flatten_params(params).items()})
        manifest = persist.write_arrays(tmp / "arrays.npz", arrays)
        meta = {
            "format": persist.SAVE_FORMAT, "format_version": persist.SAVE_VERSION,
            "base_fingerprint": fingerprint,
            "config": config_to_json(self.cfg), "settings": self._settings,
            "provenance": self.provenance, "arrays": manifest,
            "host": {"unsynced": self._unsynced.tolist(), "laid_out": self._laid_out.tolist(),
                     "num_pending": int(self._num_pending),
                     "num_refocus": int(self._num_refocus)},
        }
        persist.write_durably(tmp / "session.json", json.dumps(meta, indent=2).encode())
        for sub in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_dir(sub)  # the trees' files and their directory entries
        persist.write_checksums(tmp)
        fsync_dir(tmp)
        final = directory / f"save-{n}"
        os.rename(tmp, final)
        fsync_dir(directory)
        persist.write_durably(directory / "LATEST.tmp", final.name.encode())
        os.replace(directory / "LATEST.tmp", directory / "LATEST")  # the publication
        fsync_dir(directory)
        return final

    @staticmethod
    def _published(directory: Path) -> Path:
        """The save `directory/LATEST` names: a `save-N` directly inside `directory`."""
        pointer = directory / "LATEST"
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory (no saved session)")
        if not pointer.exists():
            raise CheckpointError(f"{directory} holds no saved session (no LATEST)")
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise persist.SaveDamagedError(f"{pointer}: unreadable ({e})") from e
        if not name.startswith("save-") or not persist.is_save_name(name):
            raise persist.SaveDamagedError(
                f"{pointer} names {name!r}, not a save inside {directory} (save-N)")
        where = directory / name
        if not where.is_dir() or where.is_symlink():
            raise persist.SaveDamagedError(f"{pointer} names {name!r}, which is not a save "
                                           f"directory in {directory}")
        return where

    @classmethod
    def load(cls, directory: str | os.PathLike, base_model, *, mesh: Mesh | None = None,
             debug_invariants: bool = False,
             on_event: Callable[[RefocusEvent], None] | None = None) -> "Session":
        """The session `save(directory)` published last, over `base_model` — the same base
        model it ran with: its architecture is checked against the saved config, and its
        weights against the saved fingerprint (`persist.BaseModelMismatchError`). Every
        file is checked against the save's `SHA256SUMS` before anything is read
        (`persist.SaveDamagedError` naming the file); a save is never removed while a load
        reads it. Every failure is a `CheckpointError`."""
        directory = Path(directory)
        if not directory.is_dir():
            why = "is not a directory" if directory.exists() else "does not exist"
            raise CheckpointError(f"{directory} holds no saved session (it {why})")
        with persist.read_lock(directory):
            return cls._load_published(cls._published(directory), base_model, mesh=mesh,
                                       debug_invariants=debug_invariants, on_event=on_event)

    @classmethod
    def _load_published(cls, where: Path, base_model, **kwargs) -> "Session":
        try:
            meta = json.loads((where / "session.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise persist.SaveDamagedError(f"{where}: unreadable session save: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != persist.SAVE_FORMAT or \
                meta.get("format_version") not in persist.READABLE_VERSIONS:
            found = meta if not isinstance(meta, dict) else (meta.get("format"),
                                                             meta.get("format_version"))
            raise CheckpointError(
                f"{where}: not a session save of format {persist.SAVE_FORMAT!r} version "
                f"{'/'.join(map(str, persist.READABLE_VERSIONS))} (found {found!r})")
        version = meta["format_version"]
        if version >= 2:
            persist.verify_checksums(where)
        else:
            warnings.warn(f"{where}: a version-1 session save has no checksums and no base "
                          f"model fingerprint: loaded unverified", stacklevel=3)
        try:
            return cls._from_meta(where, meta, base_model, **kwargs)
        except ConfigError as e:  # e.g. the saved config describes another base model
            raise CheckpointMismatchError(f"{where}: {e}") from e
        except (KeyError, IndexError, TypeError, ValueError, StoreError) as e:
            raise persist.SaveDamagedError(
                f"{where}: the save does not hold a session this version can load "
                f"({type(e).__name__}: {e})") from e

    @classmethod
    def _from_meta(cls, where: Path, meta: dict, base_model, *, mesh, debug_invariants,
                   on_event) -> "Session":
        cfg = config_from_json(meta["config"])
        arrays = persist.read_arrays(where / "arrays.npz", meta["arrays"])
        nets = {part: jax.tree.map(jnp.asarray, unflatten_params(
            {k[len(part) + 1:]: v for k, v in arrays.items() if k.startswith(part + "/")},
            str(where))) for part in ("gist", "lens")}
        session = cls(base_model, nets["gist"], nets["lens"], cfg, mesh=mesh,
                      debug_invariants=debug_invariants, on_event=on_event,
                      provenance=meta.get("provenance"), **meta["settings"])
        saved_fp = meta.get("base_fingerprint")
        if saved_fp is not None and saved_fp != session.base_fingerprint():
            raise persist.BaseModelMismatchError(
                f"{where} was saved over a base model with other weights (fingerprint "
                f"{saved_fp}) than the one given ({session.base_fingerprint()}): load it "
                f"with the base model it ran with")
        with persist.one_reader_at_a_time(where):  # the store locks what it opens
            for b, tree in enumerate(session._trees):
                with MegaContextTree.open(where / f"tree-{b}", session.mc, session._gister,
                                          block_keys=session._block_keys) as src:
                    copy_rows(src, tree)
        V = session.llama.vocab_size
        for b, tree in enumerate(session._trees):  # checksums verify bytes, not meaning
            ids = tree.tokens()
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= V):
                bad = int(ids.max()) if int(ids.max()) >= V else int(ids.min())
                raise persist.SaveDamagedError(f"{where}/tree-{b}: token id {bad} is outside "
                                               f"the base model's vocabulary [0, {V})")
        template, treedef = persist.keyed_leaves(session._state)
        saved = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
        if set(saved) != set(template) or any(
                saved[k].shape != template[k].shape or saved[k].dtype != template[k].dtype
                for k in template):
            raise CheckpointError(f"{where}: the saved state does not fit this session's "
                                  f"state (another version or base model)")
        state = jax.tree_util.tree_unflatten(treedef, [saved[k] for k in template])
        session._state = session._put(state, "state")
        host = meta["host"]
        session._unsynced = np.asarray(host["unsynced"], np.int64)
        session._laid_out = np.asarray(host["laid_out"], bool)
        session._num_pending = int(host["num_pending"])
        session._num_refocus = int(host["num_refocus"])
        session._upload_view()  # the device view of the trees (what the WC materializes from)
        return session

    # ------------------------------------------------------------------ generation

    def stream(self, max_new_tokens: int, *, eos_id: int | None = None
               ) -> Iterator[np.ndarray]:
        """Greedy tokens, yielded block by block ([B, ≤ K] int32): each stream emits its
        next tokens (pad after it emitted `eos_id`); a refocus follows every K tokens. Stops
        after `max_new_tokens` or when every stream is done. `max_new_tokens` and `eos_id`
        must be integers (an id inside the vocabulary), never truncated.

        A stream continues only while nothing else changes the session: `feed`, `force`,
        `flush` or another `stream`/`generate` between two of its blocks ends it, and
        resuming it then raises `InputError` (the tokens it yielded are in the history;
        call `stream` again to go on from the new input)."""
        n = as_int(max_new_tokens, "max_new_tokens", minimum=1, exc=InputError)
        if eos_id is not None:
            eos_id = as_int(eos_id, "eos_id", minimum=0, maximum=self.llama.vocab_size - 1,
                            exc=InputError)
        self._begin_decoding(n, "generating")
        return self._stream(n, np.int32(-1 if eos_id is None else eos_id), self._changes)

    def _changed(self) -> None:
        """Something other than the open stream changed the session: a suspended `stream`
        must not continue (see `stream`)."""
        self._changes += 1

    def _begin_decoding(self, n: int, what: str) -> None:
        """What `stream` and `force` check and reset before n tokens enter the pending
        slots: the WC is synced, every stream has history, the tokens fit."""
        self.sync()
        empty = [b for b, t in enumerate(self._trees) if t.num_tokens == 0]
        if empty:
            raise InputError(f"stream(s) {empty} have no history: feed them before {what}")
        self._check_room([self._num_pending + n] * self.batch_size)
        self._changed()
        # `done` means "emitted EOS in this generation": a new call starts every stream anew
        self._state = self._state.replace(done=jnp.zeros_like(self._state.done))

    def _stream(self, n: int, eos: np.int32, changes: int) -> Iterator[np.ndarray]:
        try:
            yield from self._stream_blocks(n, eos, changes)
        finally:  # the last refocus's event is recorded before control returns
            self._read_telemetry()

    def _stream_blocks(self, n: int, eos: np.int32, changes: int) -> Iterator[np.ndarray]:
        K, produced = self.mc.block_size, 0

        def check_current():
            if self._changes != changes:
                raise InputError(
                    f"this stream() was ended after {produced} of {n} tokens: feed, force, "
                    f"flush or another stream changed the session between its blocks (its "
                    f"tokens so far are in the history); call stream() again to continue")

        while produced < n:
            check_current()
            steps = min(n - produced, K - self._num_pending)
            self._state, out, ran = self._programs.decode(self._params, self._state,
                                                          np.int32(steps), eos)
            self._read_telemetry()  # the refocus before this block, while it decodes
            t0 = time.perf_counter()  # the block starts once that refocus is done
            ran = int(ran)
            tokens = np.asarray(out)[:, :ran]
            decode_s = time.perf_counter() - t0
            self._num_pending += ran
            produced += ran
            if ran:
                yield tokens
                check_current()
            if self._num_pending == K:
                self._refocus_pending({"decode_s": decode_s, "decoded": K})
            if ran < steps:
                return  # every stream emitted EOS

    def force(self, tokens) -> None:
        """Teacher-forced decoding: tokens [B, T] (any T >= 1) enter every stream's history
        exactly as decoded tokens do — pending slots, a refocus after every K of them
        (`trigger="decode"`) — instead of as input (`feed`, which refocuses with the input
        rules). For measuring what generation does to the cache and the WC on known text,
        e.g. with `cache_logprobs` before each block."""
        tokens = np.asarray(tokens)
        K, B = self.mc.block_size, self.batch_size
        if tokens.ndim != 2 or tokens.shape[0] != B or tokens.shape[1] < 1:
            raise InputError(f"force takes tokens [{B}, T] with T >= 1, got shape "
                             f"{tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 \
                or tokens.max() >= self.llama.vocab_size:
            raise InputError("force: token ids must be integers inside the vocabulary")
        self._begin_decoding(tokens.shape[1], "forcing")
        lo = 0
        while lo < tokens.shape[1]:
            T = min(tokens.shape[1] - lo, K - self._num_pending)
            forced = np.zeros((B, K), np.int32)
            forced[:, :T] = tokens[:, lo:lo + T]
            t0 = time.perf_counter()
            self._state, _, ran = self._programs.force(self._params, self._state,
                                                       np.int32(T), np.int32(-1), forced)
            self._read_telemetry()
            if int(ran) != T:  # cannot happen: no EOS, and T fits the pending slots
                raise RuntimeError(f"force ran {int(ran)} of {T} steps")
            self._num_pending += T
            lo += T
            if self._num_pending == K:
                self._refocus_pending({"decode_s": time.perf_counter() - t0, "decoded": K})
        self._read_telemetry()

    def generate(self, max_new_tokens: int, *, eos_id: int | None = None) -> np.ndarray:
        """Greedy generation: tokens [B, n] (n ≤ max_new_tokens; pad after a stream's EOS)."""
        chunks = list(self.stream(max_new_tokens, eos_id=eos_id))
        if not chunks:
            return np.zeros((self.batch_size, 0), np.int32)
        return np.concatenate(chunks, axis=1)

    # ------------------------------------------------------------------ inspection

    def cache_logprobs(self, tokens) -> np.ndarray:
        """Teacher-forced log-probabilities [B, T - 1] of tokens [B, T] (T <= K) continuing
        every stream's history, computed from the session's own KV cache: token i + 1 given
        the context and tokens 0..i (token 0 is conditioned on but not scored). The session
        is unchanged. This measures the cache a session decodes from — under
        `kv_reuse="approx"` its approximation — where `mcjax.eval.harness` scores a fresh
        prefill of the working context."""
        tokens = np.asarray(tokens)
        K, W, B = self.mc.block_size, self.mc.w_max, self.batch_size
        if tokens.ndim != 2 or tokens.shape[0] != B or not 2 <= tokens.shape[1] <= K:
            raise InputError(f"cache_logprobs takes tokens [{B}, T] with 2 <= T <= K = {K}, "
                             f"got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.llama.vocab_size:
            raise InputError("cache_logprobs: token ids outside the vocabulary")
        self.sync()
        if self._num_pending:
            raise InputError(f"cache_logprobs needs a refocused session; {self._num_pending} "
                             f"decoded tokens are pending (generate a multiple of K = {K})")
        first = np.asarray(pending_base_position(self._plan, self._state.wc))
        T = tokens.shape[1]
        return np.asarray(_cache_logprobs(
            self._params, self._state.cache, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(first[:, None] + np.arange(T)[None], jnp.int32),
            jnp.ones((B, T), bool), jnp.int32(W), config=self.llama))

    @property
    def working_context(self) -> wcm.WorkingContext:
        """Host copy of the batched WC (after bringing it up to date)."""
        self.sync()
        return jax.device_get(self._state.wc)

    def focus_runs(self, stream: int = 0) -> list[tuple[int, int, int, int]]:
        wc = self.working_context
        return wcm.focus_runs(jax.tree.map(lambda x: x[stream], wc), self.mc)

    def focus_map(self, stream: int = 0, width: int = 64) -> str:
        return wcm.format_focus_map(self.focus_runs(stream), width)

    def compiled_programs(self) -> dict[str, int]:
        """Compiled variants of each program (1 each after warm-up)."""
        return {name: getattr(self._programs, name)._cache_size()
                for name in ("decode", "refocus", "write_view", "force")}
