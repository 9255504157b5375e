"""The tree's read pass and gisting of complete blocks (SPEC §2.3, §2.3a).

LOD1 children are the blocks' token embeddings or, with `GistConfig.input="hidden"`, the
frozen base model's read-pass hidden states (SPEC §2.3a; chunks of `read_chunk` tokens
aligned to the history start, see `BlockGister`); only the gists are stored.

Batching and compilation. `BlockGister` gists the new blocks of one level in calls of a
*fixed* number of blocks (`gist_batch`, zero-padded; default `default_gist_batch()`), so
`gist_blocks` compiles exactly once per tree (the level is a traced argument). A fixed
batch is also what makes a tree bit-identical however its stream was chunked: XLA's CPU
dot emitter picks different kernels (hence summation orders) for different row counts, so
the same block gisted in a batch of 1 and of 64 differs by ~1e-6, while inside one fixed
batch shape a block's result does not depend on its row. An append of m new blocks at a
level costs ceil(m / gist_batch) calls, dispatched back to back (asynchronously) and
gathered once. With the read pass the features themselves come from whole-chunk reads
(chunks complete when read) or cached steps (the open chunk; see `ChunkReader`), so a tree
with `GistConfig.input="hidden"` or retrieval keys is bit-identical for the same feeding
and equal to fp32 rounding however fed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.base.model import (embed_tokens, init_read_cache, read_depth, read_pass_core,
                              read_step_core)
from mcjax.config import GistConfig, LlamaConfig
from mcjax.gist import gist_blocks

__all__ = ["READ_MODE", "ReadState", "ChunkReader", "default_gist_batch", "BlockGister"]

READ_MODE = "chunks+kv-steps"  # how the read pass runs (metadata.json "read"; ChunkReader)


@dataclasses.dataclass
class ReadState:
    """One tree's read of its open chunk (`ChunkReader`): `cache` holds the first `filled`
    tokens of chunk `chunk` (-1: nothing yet)."""

    chunk: int = -1
    filled: int = 0
    cache: Any = None


class ChunkReader:
    """The tree's one read pass of new tokens (SPEC §2.3a): chunks of R = `chunk` tokens
    aligned to the history start, each read independently (causal, positions 0..R-1), as
    `base.model.read_pass_core` reads them, in one forward as deep as the deepest output:
    GistNet's input ("hidden", after `hidden_layer` layers) and the retrieval keys
    ("keys", pre-RoPE at `qk_layers`) come from the same forward, so a history token goes
    through the base model once whatever the tree keeps.

    * A chunk that is complete when its read begins is read whole: one R-token forward
      (`whole`), as fast as bulk reading gets.
    * Any other chunk (the history ended inside it when its read began) is read a
      segment at a time — segments cut at every block (K) and chunk (R) boundary of the
      history — each one `step`
      (`read_step_core`) over a KV cache of the chunk's earlier tokens kept in the tree's
      `ReadState`, up to and including the block that completes it (reading it whole
      then would read its earlier tokens twice). So streaming reads each new token once
      (re-reading the chunk's prefix per block cost R/K x the work).

    Such a chunk is always read by steps from its start, so its cache — and every
    output read over it — depends only on history positions: a state that does not hold
    the chunk's earlier tokens (a tree reopened from disk, a copy, no state given) is
    rebuilt by replaying them through the same steps, to the same bits. A token's features
    therefore depend on whether its chunk was complete when its read began: whole or in
    pieces, trees agree to fp32 rounding (the two paths are the same arithmetic in other
    shapes), and bit for bit for the same feeding. `calls` counts forwards (steps and
    whole chunks), `tokens_read` the tokens they read (replays included); each token read
    costs `depth` decoder-layer passes."""

    def __init__(self, step: Callable, new_cache: Callable[[], Any], whole: Callable, *,
                 chunk: int, block_size: int, hidden_layer: int | None = None,
                 qk_layers: Sequence[int] = ()):
        if chunk < 1 or block_size < 1:
            raise ValueError(f"chunk and block_size must be >= 1, got {chunk}, {block_size}")
        qk = tuple(int(x) for x in qk_layers)
        if hidden_layer is None and not qk:
            raise ValueError("a reader reads hidden states (hidden_layer) or keys (qk_layers)")
        self.step, self.new_cache, self.whole = step, new_cache, whole
        self.chunk, self.block_size = int(chunk), int(block_size)
        self.hidden_layer, self.qk_layers = hidden_layer, qk
        self.outputs = (("hidden",) if hidden_layer is not None else ()) + \
            (("keys",) if qk else ())
        self.calls = 0
        self.tokens_read = 0

    @property
    def depth(self) -> int:
        """Decoder layers one read runs through (each token read passes through them once)."""
        return read_depth(self.hidden_layer, self.qk_layers)

    @classmethod
    def from_base(cls, base_params: Any, base_config: LlamaConfig, *, chunk: int,
                  block_size: int, hidden_layer: int | None = None,
                  qk_layers: Sequence[int] = ()) -> "ChunkReader":
        """A reader of the frozen base model: "hidden" after `hidden_layer` layers and/or
        pre-RoPE "keys" at the 0-based `qk_layers`, one forward for both."""
        qk = tuple(int(x) for x in qk_layers)
        keep = (("hidden",) if hidden_layer is not None else ()) + (("keys",) if qk else ())

        def step(params, cache, ids, index):
            out, cache = read_step_core(params, base_config, cache, ids, index,
                                        hidden_layer=hidden_layer, qk_layers=qk)
            return {k: out[k] for k in keep}, cache

        def whole(params, ids):
            out = read_pass_core(params, base_config, ids, chunk=chunk,
                                 hidden_layer=hidden_layer, qk_layers=qk)
            return {k: out[k] for k in keep}

        step, whole = jax.jit(step, donate_argnums=1), jax.jit(whole)
        return cls(lambda cache, ids, index: step(base_params, cache, ids, index),
                   lambda: init_read_cache(base_config, chunk, hidden_layer, qk),
                   lambda ids: whole(base_params, ids),
                   chunk=chunk, block_size=block_size, hidden_layer=hidden_layer,
                   qk_layers=qk)

    def segments(self, start: int, stop: int):
        """(a, b) pieces of history positions [start, stop), cut at multiples of K and R."""
        K, R = self.block_size, self.chunk
        a = start
        while a < stop:
            b = min(stop, (a // K + 1) * K, (a // R + 1) * R)
            yield a, b
            a = b

    def chunk_start(self, offset: int) -> int:
        return (offset // self.chunk) * self.chunk

    def read(self, ids: np.ndarray, first: int, new: int, state: ReadState | None = None
             ) -> dict[str, np.ndarray]:
        """{output: [len(ids) - (new - first), ...] float32} of history tokens [new, first +
        len(ids)) for each of `outputs`; `ids` are the history's tokens from position
        `first` = `chunk_start(new)` on (what the cache of `new`'s chunk must hold before
        them)."""
        ids = np.asarray(ids, np.int32)
        R = self.chunk
        stop = first + len(ids)
        if first != self.chunk_start(new) or not first <= new <= stop:
            raise ValueError(f"ids must start at the chunk start {self.chunk_start(new)} of "
                             f"position {new}, got start {first} for positions up to {stop}")
        state = ReadState() if state is None else state
        outs: list[dict] = []
        for cs in range(first, stop, R):
            ce, a = min(cs + R, stop), max(new, cs)
            piece = ids[cs - first:ce - first]
            if ce - cs == R and a == cs:  # a complete chunk, none of it read before: whole
                out = self.whole(jnp.asarray(piece[None]))
                self.calls += 1
                self.tokens_read += R
                outs.append({k: v[0, a - cs:] for k, v in out.items()})
                if state.chunk == cs // R:
                    state.chunk, state.filled, state.cache = -1, 0, None
                continue
            if (state.chunk, state.filled) != (cs // R, a - cs) or state.cache is None:
                state.chunk, state.filled, state.cache = cs // R, 0, None  # replay the prefix
                for x, y in self.segments(cs, a):
                    self._step(state, piece[x - cs:y - cs], x)
            outs += [{k: v[0] for k, v in self._step(state, piece[x - cs:y - cs], x).items()}
                     for x, y in self.segments(a, ce)]
            if ce - cs == R:  # the chunk is complete: no later read continues it
                state.chunk, state.filled, state.cache = -1, 0, None
        if not outs:
            return {k: np.zeros((0,), np.float32) for k in self.outputs}
        return {k: np.concatenate([np.asarray(o[k], np.float32) for o in outs])
                for k in self.outputs}

    def _step(self, state: ReadState, ids: np.ndarray, position: int) -> dict:
        index = position % self.chunk
        if index == 0 or state.cache is None:
            state.chunk, state.filled, state.cache = position // self.chunk, 0, self.new_cache()
        out, state.cache = self.step(state.cache, jnp.asarray(ids[None]), jnp.int32(index))
        state.filled = index + len(ids)
        self.calls += 1
        self.tokens_read += len(ids)
        return out


def default_gist_batch() -> int:
    """Blocks per gist call when none is given. On CPU a block costs about the same in any
    batch of >= 4 (measured at SmolLM2 width: ~18 ms/block alone, ~10-11 ms in batches of
    4-64), so 4 keeps streaming (one block per append, padded to the batch) cheap; on an
    accelerator one call's latency hardly depends on the batch, so bulk ingestion wants
    bigger batches."""
    return 4 if jax.default_backend() == "cpu" else 32


class BlockGister:
    """Gists complete blocks for a tree in fixed-size batches (see the module docstring),
    and hosts the tree's read pass (`reader`, a `ChunkReader`: one forward per chunk for
    everything the tree keeps).

    LOD1 children (`GistConfig.input`):
    * "embeddings": `embed_fn(ids[G, K] int32) -> [G, K, D]` maps LOD0 ids to the base
      model's token embeddings.
    * "hidden": the read pass (SPEC §2.3a): the base model's hidden states after
      `input_layer` layers, in chunks of R = `read_chunk` tokens aligned to the history
      start — token t's features are those of position t % R of chunk t // R, what
      `layer_hidden(..., chunk=R)` of the whole history gives (up to rounding). The tree
      reads its new complete blocks once (`read_blocks`, with its `ReadState` — the open
      chunk's KV cache — and the tokens from the chunk's start) and hands the hidden
      states to `block_inputs`: complete chunks are read whole, the open chunk by cached
      steps (features equal to rounding however the stream was chunked, bit-identical
      for the same chunking). Hidden states are transient: only gists are stored.

    With `retrieval` (a `RetrievalConfig`), the same read also yields the retrieval keys
    the tree stores (`retrieval.BlockKeys`): one chunk size (`read_chunk` =
    `retrieval.chunk`), one forward as deep as the deepest layer either needs.

    Use `BlockGister.from_base` to build both from the frozen base model.
    """

    def __init__(self, gist_cfg: GistConfig, gist_params: Any,
                 embed_fn: Callable[[jax.Array], jax.Array] | None, *, embed_dim: int,
                 block_size: int, vocab_size: int | None = None,
                 gist_batch: int | None = None, reader: ChunkReader | None = None):
        gist_batch = default_gist_batch() if gist_batch is None else gist_batch
        if gist_batch < 1:
            raise ValueError(f"gist_batch must be >= 1, got {gist_batch}")
        d_params = gist_params["out_proj"]["kernel"].shape[-1]
        if d_params != embed_dim:
            raise ValueError(f"GistNet params output width {d_params}, but embed_dim is "
                             f"{embed_dim}")
        if reader is not None and reader.block_size != block_size:
            raise ValueError(f"the reader reads blocks of {reader.block_size}, the tree's "
                             f"are {block_size}")
        if gist_cfg.input == "hidden":
            if reader is None or reader.hidden_layer is None:
                raise ValueError("GistConfig.input='hidden' gists the base model's read-pass "
                                 "hidden states: pass a reader of them (or use "
                                 "BlockGister.from_base)")
            if (reader.chunk, reader.hidden_layer) != (gist_cfg.read_chunk,
                                                       gist_cfg.input_layer):
                raise ValueError(f"the reader reads hidden states after {reader.hidden_layer} "
                                 f"layers in chunks of {reader.chunk}; this GistNet wants "
                                 f"input_layer {gist_cfg.input_layer}, read_chunk "
                                 f"{gist_cfg.read_chunk}")
        elif embed_fn is None:
            raise ValueError("GistConfig.input='embeddings' needs embed_fn")
        self.cfg, self.params, self.embed_fn, self.reader = gist_cfg, gist_params, embed_fn, \
            reader
        self.embed_dim, self.block_size = embed_dim, block_size
        self.vocab_size, self.gist_batch = vocab_size, gist_batch
        self._embed_checked = False
        self.calls = 0  # GistNet calls (of gist_batch blocks) so far, every tree's

    @property
    def read_calls(self) -> int:
        """Read-pass forwards so far (steps of at most K tokens and whole chunks)."""
        return 0 if self.reader is None else self.reader.calls

    @classmethod
    def from_base(cls, gist_cfg: GistConfig, gist_params: Any, base_params: Any,
                  base_config: LlamaConfig, *, block_size: int,
                  gist_batch: int | None = None, retrieval: Any = None) -> "BlockGister":
        """LOD1 children from the frozen base model: its token embeddings
        (`embed_tokens`) or, for `gist_cfg.input == "hidden"`, its read-pass hidden states
        after `gist_cfg.input_layer` layers. With `retrieval` (a `RetrievalConfig`) the
        read pass also reads the retrieval keys at `retrieval.layers` — the same forward,
        so both need one chunk size."""
        embed = jax.jit(embed_tokens)  # params are an argument, not baked-in constants
        hidden = gist_cfg.input == "hidden"
        if hidden and gist_cfg.input_layer > base_config.num_layers:
            raise ValueError(f"GistConfig.input_layer={gist_cfg.input_layer}, but the base "
                             f"model has only {base_config.num_layers} decoder layers")
        qk: tuple[int, ...] = ()
        chunk = gist_cfg.read_chunk
        if retrieval is not None:
            qk = tuple(int(x) for x in retrieval.layers)
            if max(qk) >= base_config.num_layers:
                raise ValueError(f"retrieval.layers {qk} exceed the base model's "
                                 f"{base_config.num_layers} layers")
            if hidden and retrieval.chunk != gist_cfg.read_chunk:
                raise ValueError(
                    f"one read pass gives GistNet's hidden states and the retrieval keys, "
                    f"so they need one chunk size: GistConfig.read_chunk is "
                    f"{gist_cfg.read_chunk}, RetrievalConfig.chunk {retrieval.chunk}")
            chunk = retrieval.chunk
        reader = None
        if hidden or qk:
            reader = ChunkReader.from_base(base_params, base_config, chunk=chunk,
                                           block_size=block_size,
                                           hidden_layer=gist_cfg.input_layer if hidden else None,
                                           qk_layers=qk)
        return cls(gist_cfg, gist_params, lambda ids: embed(base_params, ids),
                   embed_dim=base_config.hidden_size, block_size=block_size,
                   vocab_size=base_config.vocab_size, gist_batch=gist_batch, reader=reader)

    @property
    def input(self) -> str:
        return self.cfg.input

    def input_signature(self) -> dict:
        """What LOD1 gists are made from (recorded in an on-disk store's metadata.json)."""
        sig = {"gist_input": self.cfg.input}
        if self.cfg.input == "hidden":
            sig.update(input_layer=self.cfg.input_layer, read_chunk=self.cfg.read_chunk)
        return sig

    def context_start(self, offset: int) -> int:
        """First token the read of a block starting at token `offset` depends on: the
        start of its read chunk (a tree with a read pass), else the block itself."""
        if self.reader is not None:
            return self.reader.chunk_start(offset)
        return offset

    def read_blocks(self, ids: np.ndarray, *, context: np.ndarray | None = None,
                    context_at: int = 0, state: ReadState | None = None
                    ) -> dict[str, np.ndarray]:
        """The read pass of new complete blocks' tokens `ids` [m*K]: {"hidden": [m*K, D]}
        and/or {"keys": [m*K, layers, kv_heads, head_dim]} float32 (the reader's
        `outputs`), one forward for both. `context` holds the token ids from the start of
        the first block's read chunk up to that block (`context_start`; fewer than a
        chunk) starting at history position `context_at`, `state` the tree's `ReadState`
        (None: rebuilt from `context`)."""
        if self.reader is None:
            return {}
        R = self.reader.chunk
        ids = np.asarray(ids, np.int32)
        ctx = np.zeros((0,), np.int32) if context is None else np.asarray(context, np.int32)
        if ctx.ndim != 1 or len(ctx) >= R or context_at % R:
            raise ValueError(f"context must be the < read chunk={R} token ids from the start "
                             f"of the first block's read chunk, got shape {ctx.shape} at "
                             f"history position {context_at}")
        out = self.reader.read(np.concatenate([ctx, ids]), context_at,
                               context_at + len(ctx), state)
        if "hidden" in out and out["hidden"].shape != (len(ids), self.embed_dim):
            raise ValueError(f"the reader returned hidden states {out['hidden'].shape} for "
                             f"{len(ids)} tokens; expected {(len(ids), self.embed_dim)}")
        return out

    def __call__(self, level: int, children: np.ndarray, out_dtype: np.dtype, *,
                 context: np.ndarray | None = None, read_state: ReadState | None = None,
                 context_at: int = 0) -> np.ndarray:
        """children: [m*K] token ids (level 1) or [m*K, D] gists of level-1 -> [m, D]
        (the read pass, if GistNet reads hidden states, then GistNet; arguments as
        `read_blocks`, ignored for "embeddings" and above level 1)."""
        features = None
        if level == 1 and self.cfg.input == "hidden":
            m = len(children) // self.block_size
            features = self.read_blocks(np.asarray(children)[: m * self.block_size],
                                        context=context, context_at=context_at,
                                        state=read_state)["hidden"]
        inputs = self.block_inputs(level, children, features=features)
        return self.gist_inputs(level, [inputs], out_dtype)[0]

    def block_inputs(self, level: int, children: np.ndarray, *,
                     features: np.ndarray | None = None) -> np.ndarray:
        """What GistNet reads for the m = len(children) // K new blocks: [m, K] int32
        token ids (level 1, "embeddings": embedded per call), else [m, K, D] float32 (the
        read pass's hidden states `features` [m*K, D] at level 1 — `read_blocks` — and the
        child gists above). GistNet runs in `gist_inputs`."""
        K, D = self.block_size, self.embed_dim
        m = len(children) // K
        if level == 1 and self.cfg.input == "hidden":
            if m == 0:
                return np.zeros((0, K, D), np.float32)
            if features is None or len(features) != m * K:
                raise ValueError(f"GistNet reads hidden states: pass the read pass's features "
                                 f"of the {m * K} tokens (read_blocks), got "
                                 f"{None if features is None else np.shape(features)}")
            return np.asarray(features, np.float32).reshape(m, K, D)
        if level == 1:
            return np.asarray(children)[: m * K].reshape(m, K).astype(np.int32)
        return np.asarray(children)[: m * K].reshape(m, K, D).astype(np.float32)

    def gist_inputs(self, level: int, inputs: Sequence[np.ndarray], out_dtype: np.dtype
                    ) -> list[np.ndarray]:
        """Gist several trees' new blocks of one level together: `inputs` are
        `block_inputs` results, concatenated into calls of `gist_batch` blocks (the last
        one zero-padded), so B streams with one new block each cost one call, not B. A
        block's gist does not depend on its row inside the fixed batch shape (module
        docstring), so this equals gisting each tree's blocks alone, bit for bit.
        Returns one [m_i, D] array per input, in `out_dtype`."""
        G, jdtype = self.gist_batch, jnp.dtype(out_dtype)
        sizes = [len(x) for x in inputs]
        m = sum(sizes)
        if m == 0:
            return [np.zeros((0, self.embed_dim), out_dtype) for _ in inputs]
        blocks = np.concatenate([x for x in inputs if len(x)])
        padded = -(-m // G) * G
        if padded != m:  # zero-pad to whole batches; the padding's gists are dropped
            blocks = np.concatenate([blocks, np.zeros((padded - m,) + blocks.shape[1:],
                                                      blocks.dtype)])
        outs = []
        for i in range(0, padded, G):  # async dispatch: calls queue back to back
            chunk = blocks[i:i + G]
            if level == 1 and self.cfg.input == "embeddings":
                chunk = self._embed(chunk)
            outs.append(gist_blocks(self.params, self.cfg, jnp.asarray(chunk, jnp.float32),
                                    level).astype(jdtype))
        self.calls += len(outs)
        gists = np.concatenate([np.asarray(o) for o in outs])[:m].astype(out_dtype, copy=False)
        return np.split(gists, np.cumsum(sizes)[:-1])

    def _embed(self, ids: np.ndarray) -> jax.Array:
        emb = self.embed_fn(jnp.asarray(ids))
        if not self._embed_checked:
            want = ids.shape + (self.embed_dim,)
            if tuple(emb.shape) != want or not jnp.issubdtype(emb.dtype, jnp.floating):
                raise ValueError(f"embed_fn returned {emb.shape} {emb.dtype} for ids "
                                 f"{ids.shape}; expected floating {want}")
            self._embed_checked = True
        return emb.astype(jnp.float32)
