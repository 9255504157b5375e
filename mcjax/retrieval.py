"""Training-free, query-aware focus scores (`focus_policy="retrieval"`, SPEC §2.3a, §2.6).

The read pass keeps, for every LOD1 block of the history, the frozen base model's pre-RoPE
keys of all the block's tokens at a few layers (`RetrievalConfig.layers`), read in
independent history-aligned chunks (`BlockKeys`, stored by the tree beside the gists).
At refocus:

1. `query_vectors`: the newest `queries` tokens' pre-RoPE queries at the same layers, read
   over the last `query_window` tokens of the history (one small fixed-shape forward);
2. `block_relevance`: per block and (layer, head), the max q·k over the queries and the
   block's tokens (never a chunk's first token, which is the read chunk's own attention
   sink); z-scored per (layer, head) over the scoreable blocks (not the sink, not the
   protected tail — both stay raw anyway), then the max over (layer, head) is the
   relevance (`normalize_heads=False`: the raw max over (layer, head), then z-scored);
3. `block_scores`: the `top_blocks_for(W_max)` most relevant blocks get scores in
   [0.6, 1.0] by rank, their neighbours within `spread` blocks (and the `follow` blocks
   after each) 0.95**d of that (a fact straddles a block boundary more often than not);
   the rest 0;
4. `slot_scores`: a WC slot's score is the max over the blocks its span covers (an LOD2
   gist: over its 32 children). While some gist slot holds a relevant block, every other
   span scores below -tau_collapse, oldest lowest, so the allocator makes room by
   collapsing the oldest irrelevant groups; otherwise they score in (-tau_collapse, 0)
   (no action), oldest lowest, below the relevant spans, so budget and headroom
   collapses take irrelevant spans first. Legality is
   LensNet's (`lens.mask_illegal`), so the scores enter the same allocator.

Pure jittable functions over fixed shapes; all measured choices are recorded in
`results/retrieval_probe/`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from mcjax import lens
from mcjax import working_context as wcm
from mcjax.config import LlamaConfig, MCConfig, RetrievalConfig

__all__ = ["key_width", "key_shape", "BlockKeys", "tail_read", "query_vectors",
           "block_relevance", "top_blocks_for", "block_scores", "span_max",
           "slot_retrieval_features", "NUM_SLOT_RETRIEVAL_FEATURES", "slot_scores",
           "stream_conditioning", "stream_block_scores", "RELEVANT_FLOOR",
           "key_bytes_per_million_tokens", "key_dtype"]

RELEVANT_FLOOR = 0.6  # score of the last of the top blocks; the first gets 1.0
NEIGHBOUR_DECAY = 0.95  # a neighbour d blocks from a top block scores decay**d of it
RELEVANCE_GROUP = 256  # blocks scored per step of `block_relevance`'s loop
_KEY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def key_shape(rc: RetrievalConfig, llama: LlamaConfig, block_size: int) -> tuple[int, ...]:
    """Per-block key array shape [K, layers, kv_heads, head_dim]."""
    return (block_size, len(rc.layers), llama.num_kv_heads, llama.head_dim)


def key_width(rc: RetrievalConfig, llama: LlamaConfig, block_size: int) -> int:
    """Values per block as stored (one flat row per block)."""
    return int(np.prod(key_shape(rc, llama, block_size)))


def key_dtype(rc: RetrievalConfig) -> np.dtype:
    return np.dtype(_KEY_DTYPES[rc.key_dtype])


class BlockKeys:
    """The retrieval keys a tree keeps per LOD1 block (SPEC §2.3a): the base model's
    pre-RoPE keys of the block's tokens at `rc.layers`, from chunks of R = `rc.chunk`
    tokens aligned to the history start, one flat row per block in `rc.key_dtype`.

    The tree's one read pass reads them (`tree.ChunkReader`, built by
    `tree.BlockGister.from_base(..., retrieval=rc)`): the same forward as GistNet's
    hidden input, each token read once — complete chunks whole, the open chunk by cached
    steps — so keys agree to rounding however the stream was chunked."""

    def __init__(self, rc: RetrievalConfig, llama: LlamaConfig, block_size: int):
        if max(rc.layers) >= llama.num_layers:
            raise ValueError(f"retrieval.layers {rc.layers} exceed the base model's "
                             f"{llama.num_layers} layers")
        self.rc, self.block_size = rc, block_size
        self.shape = key_shape(rc, llama, block_size)
        self.width = key_width(rc, llama, block_size)
        self.dtype = key_dtype(rc)

    def signature(self) -> dict:
        """What the stored keys are (recorded in an on-disk store's metadata.json)."""
        return {"layers": list(self.rc.layers), "chunk": self.rc.chunk,
                "key_dtype": self.rc.key_dtype, "width": self.width}

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The read pass's keys [m*K, layers, kv_heads, head_dim] -> [m, width] rows in
        the storage dtype."""
        m = len(keys) // self.block_size
        return np.asarray(keys[: m * self.block_size]).reshape(m, self.width).astype(
            self.dtype)


def tail_read(base_params, llama: LlamaConfig, rc: RetrievalConfig, tokens: jax.Array,
              num_tokens: jax.Array, *, hidden_layer: int | None = None,
              hidden_tokens: int = 0) -> dict:
    """One read of the last `rc.query_window` of the first `num_tokens` ids in `tokens` [C0]
    (a tree view), giving what query-aware focus needs. Jittable, fixed shapes:

    - "queries" [layers, rc.queries, heads, head_dim]: the newest `rc.queries` tokens'
      pre-RoPE queries at `rc.layers`, "query_valid" [rc.queries] which of them exist
      (fewer tokens than queries: the missing ones are masked);
    - with `hidden_layer`: "hidden" [hidden_tokens, D], the newest `hidden_tokens` tokens'
      hidden states after that many layers (LensNet v2's view of the question), and
      "hidden_valid" [hidden_tokens]."""
    from mcjax.base.model import read_pass_core

    R, Q = rc.query_window, rc.queries
    C0 = tokens.shape[0]
    if C0 < R:  # a view shorter than the window: pad (padding sits after, causal)
        tokens = jnp.pad(tokens, (0, R - C0))
    start = jnp.clip(num_tokens - R, 0, tokens.shape[0] - R)
    window = jax.lax.dynamic_slice_in_dim(tokens, start, R)
    read = read_pass_core(base_params, llama, window[None], chunk=R, hidden_layer=hidden_layer,
                          qk_layers=tuple(rc.layers))

    def newest(x, n):  # x [R, ...] -> its newest n rows of the history, and which exist
        rows = num_tokens - start - n + jnp.arange(n)
        return jnp.take(x, jnp.clip(rows, 0, R - 1), axis=0), rows >= 0

    q, valid = newest(read["queries"][0], Q)  # [Q, layers, H, hd]
    out = {"queries": jnp.transpose(q, (1, 0, 2, 3)).astype(jnp.float32),
           "query_valid": valid}
    if hidden_layer is not None:
        h, hv = newest(read["hidden"][0], hidden_tokens)
        out["hidden"], out["hidden_valid"] = jnp.where(hv[:, None], h, 0.0), hv
    return out


def query_vectors(base_params, llama: LlamaConfig, rc: RetrievalConfig, tokens: jax.Array,
                  num_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pre-RoPE queries [layers, queries, heads, head_dim] of the newest `rc.queries` of
    the first `num_tokens` ids in `tokens` [C0] and which of them exist [queries]
    (`tail_read` without hidden states)."""
    out = tail_read(base_params, llama, rc, tokens, num_tokens)
    return out["queries"], out["query_valid"]


def block_relevance(keys: jax.Array, num_tokens: jax.Array, queries: jax.Array,
                    query_valid: jax.Array, rc: RetrievalConfig, mc: MCConfig,
                    llama: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """Relevance [C1] of every block row of `keys` [C1, width] to the queries (module
    docstring, step 2) and which blocks are scoreable [C1] (complete, outside the sink
    and the protected tail; relevance of the others is -inf)."""
    K = mc.block_size
    C1 = keys.shape[0]
    nl, kvh, hd = len(rc.layers), llama.num_kv_heads, llama.head_dim
    G = llama.num_heads // kvh
    q = queries.reshape(nl, -1, kvh, G, hd)
    # Blocks in fixed-size groups (lax.map): the [blocks, L, K, Q, kv, G] products and the
    # keys' float32 copy then stay cache-sized; the same values as one einsum, ~2x faster
    # on CPU at 6,250 blocks (the cost is linear in the history: every refocus reads
    # every block's keys).
    n = max(1, min(RELEVANCE_GROUP, C1))  # a view of no blocks still scores (to nothing)
    pad = -C1 % n
    groups = jnp.pad(keys, ((0, pad), (0, 0))).reshape(-1, n, keys.shape[1])
    first = jnp.arange(groups.shape[0]) * n

    def group_max(args):
        group, b0 = args
        k = group.reshape(n, K, nl, kvh, hd).astype(jnp.float32)
        s = jnp.einsum("lqkgd,ntlkd->nltqkg", q, k)  # [n, L, K, Q, kv, G]
        token = (b0 + jnp.arange(n))[:, None] * K + jnp.arange(K)[None, :]
        ok_token = (token % rc.chunk) != 0  # a read chunk's first token is its own sink
        ok = (ok_token[:, None, :, None, None, None]
              & query_valid[None, None, None, :, None, None])
        return jnp.max(jnp.where(ok, s, -jnp.inf), axis=(2, 3))

    s = jax.lax.map(group_max, (groups, first)).reshape(-1, nl * kvh * G)[:C1]
    blocks = jnp.arange(C1)
    scoreable = ((blocks >= mc.sink_blocks)
                 & ((blocks + 1) * K <= num_tokens - mc.recent_protect))
    if rc.normalize_heads:
        rel = jnp.max(_zscore(s, scoreable), axis=1)
    else:  # the raw max over heads, z-scored afterwards: its ranks, a z-score's scale
        rel = _zscore(jnp.max(s, axis=1, keepdims=True), scoreable)[:, 0]
    return jnp.where(scoreable, rel, -jnp.inf), scoreable


def _zscore(s: jax.Array, scoreable: jax.Array) -> jax.Array:
    """Each column of s [C1, H] standardized over the scoreable rows [C1]."""
    n = jnp.maximum(jnp.sum(scoreable), 1)
    w = scoreable[:, None]
    mean = jnp.sum(jnp.where(w, s, 0.0), axis=0) / n
    var = jnp.sum(jnp.where(w, (s - mean) ** 2, 0.0), axis=0) / n
    return (s - mean) / (jnp.sqrt(var) + 1e-6)


def top_blocks_for(rc: RetrievalConfig, mc: MCConfig) -> int:
    """How many top blocks a WC of `mc.w_max` slots takes: `rc.top_blocks`, raised so that
    they and their `follow` / `spread` neighbours fill `rc.relevant_share` of W_max."""
    per_top = mc.block_size * (1 + rc.follow + 2 * rc.spread)
    return max(rc.top_blocks, int(rc.relevant_share * mc.w_max) // per_top)


def block_scores(rel: jax.Array, scoreable: jax.Array, rc: RetrievalConfig,
                 top_blocks: int | None = None) -> jax.Array:
    """[C1] scores: the `top_blocks` (default `rc.top_blocks`; the runtime passes
    `top_blocks_for`) most relevant scoreable blocks get 1.0 (best) down to RELEVANT_FLOOR
    by rank, blocks within `rc.spread` of one (or up to `rc.follow` after it)
    NEIGHBOUR_DECAY**distance of its score; every other block 0."""
    C1 = rel.shape[0]
    k = min(rc.top_blocks if top_blocks is None else top_blocks, C1)
    _, idx = jax.lax.top_k(rel, k)
    step = (1.0 - RELEVANT_FLOOR) / max(k - 1, 1)
    value = 1.0 - step * jnp.arange(k, dtype=jnp.float32)
    value = jnp.where(scoreable[idx], value, 0.0)  # fewer scoreable blocks than k
    out = jnp.zeros((C1,), jnp.float32).at[idx].set(value)
    # a fact often straddles a block boundary (the phrase the question matches in one
    # block, the answer in the next): neighbours within `spread` blocks come along
    spread = out
    for d in range(1, max(rc.spread, rc.follow) + 1):
        decay = NEIGHBOUR_DECAY ** d
        if d < C1:
            spread = jnp.maximum(spread, jnp.pad(out[:-d], (d, 0)) * decay)  # d after
            if d <= rc.spread:
                spread = jnp.maximum(spread, jnp.pad(out[d:], (0, d)) * decay)  # d before
    return spread


def stream_conditioning(base_params, llama: LlamaConfig, rc: RetrievalConfig, mc: MCConfig,
                        tokens: jax.Array, keys: jax.Array | None, counts: jax.Array, *,
                        hidden_layer: int | None = None, hidden_tokens: int = 0) -> dict:
    """What query-aware focus needs of one stream, from its tree view (tokens [C0], keys
    [C1, width] or None, counts [levels+1]) in one `tail_read`: with keys, "rel" [C1]
    (`block_relevance`, -inf where not scoreable) and "blocks" [C1] (`block_scores`);
    with `hidden_layer`, "hidden" [hidden_tokens, D] and "hidden_valid" (LensNet v2's
    question). Jittable, fixed shapes."""
    read = tail_read(base_params, llama, rc, tokens, counts[0], hidden_layer=hidden_layer,
                     hidden_tokens=hidden_tokens)
    out = {}
    if keys is not None:
        rel, ok = block_relevance(keys, counts[0], read["queries"], read["query_valid"], rc,
                                  mc, llama)
        out["rel"], out["blocks"] = rel, block_scores(rel, ok, rc, top_blocks_for(rc, mc))
    if hidden_layer is not None:
        out["hidden"], out["hidden_valid"] = read["hidden"], read["hidden_valid"]
    return out


def stream_block_scores(base_params, llama: LlamaConfig, rc: RetrievalConfig, mc: MCConfig,
                        tokens: jax.Array, keys: jax.Array, counts: jax.Array) -> jax.Array:
    """One stream's block scores [C1] from its tree view (tokens [C0], keys [C1, width],
    counts [levels+1]): steps 1-3 of the module docstring."""
    return stream_conditioning(base_params, llama, rc, mc, tokens, keys, counts)["blocks"]


def span_max(wc: wcm.WorkingContext, blocks: jax.Array, mc: MCConfig,
             fill: float = 0.0) -> jax.Array:
    """[W] max of per-block values `blocks` [C1] over each slot's span (a token: its block;
    an LOD-l gist: its K^(l-1) blocks); `fill` for padding slots and spans past the
    blocks."""
    K, L = mc.block_size, mc.num_levels
    C1 = blocks.shape[0]
    per_level = [blocks]  # per_level[l-1][n]: max block value under LOD-l node n
    for _ in range(2, L + 1):
        prev = per_level[-1]
        rows = -(-prev.shape[0] // K)
        prev = jnp.pad(prev, (0, rows * K - prev.shape[0]), constant_values=fill)
        per_level.append(jnp.max(prev.reshape(rows, K), axis=1))
    node = wc.node
    block_of_token = node // K
    out = jnp.where((wc.level == 0) & (block_of_token < C1),
                    blocks[jnp.clip(block_of_token, 0, C1 - 1)], fill)
    for l, arr in enumerate(per_level, start=1):
        n = arr.shape[0]
        out = jnp.where((wc.level == l) & (node < n), arr[jnp.clip(node, 0, n - 1)], out)
    return jnp.where(wc.valid, out, fill)


NUM_SLOT_RETRIEVAL_FEATURES = lens.NUM_SLOT_RETRIEVAL_FEATURES
_Z_SCALE = 10.0  # relevance z-scores of top blocks lie around 5-15


def slot_retrieval_features(wc: wcm.WorkingContext, rel: jax.Array, blocks: jax.Array,
                            mc: MCConfig) -> jax.Array:
    """[W, 2] LensNet v2's per-slot retrieval inputs: the retrieval score of the slot's
    span (`span_max` of `block_scores`, in [0, 1]) and its best block's relevance
    z-score / 10 clipped to [-1, 3] (0 where nothing is scoreable: sink, protected tail,
    padding)."""
    z = jnp.where(jnp.isfinite(rel), jnp.clip(rel / _Z_SCALE, -1.0, 3.0), -jnp.inf)
    zmax = span_max(wc, z, mc, fill=-jnp.inf)
    zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
    return jnp.stack([span_max(wc, blocks, mc), zmax], axis=-1)


def slot_scores(wc: wcm.WorkingContext, blocks: jax.Array, mc: MCConfig) -> jax.Array:
    """Scores [W] of one WC from its stream's block scores [C1] (module docstring, step 4)."""
    score = span_max(wc, blocks, mc)
    relevant = score > 0.0
    need = jnp.any(relevant & (wc.level >= 1) & wc.valid)
    frac = wcm.span_end_fraction(wc, mc)
    # below -tau_collapse however young; the oldest lowest (collapsed first)
    make_room = -(mc.tau_collapse + 0.05) - 0.5 * (1.0 - frac)
    # Nothing waits: no action (above -tau_collapse), but irrelevant spans still score
    # below relevant ones (0 once raw: LOD0 cannot expand), oldest lowest, so collapses
    # the allocator does not choose (budget, headroom: `wcm.collapse_groups`' lowest mean)
    # take them first. At 0 they tied with the needle's raw blocks and the oldest raw
    # group went — often the needle, right before the answer (results/README.md).
    idle = -0.5 * mc.tau_collapse * (1.0 - 0.5 * frac)
    score = jnp.where(relevant, score, jnp.where(need, make_room, idle))
    return lens.mask_illegal(score, wc, mc)


def key_bytes_per_million_tokens(rc: RetrievalConfig, llama: LlamaConfig,
                                 block_size: int) -> float:
    """Stored retrieval-key bytes per 1,000,000 history tokens (all keys of every token at
    `rc.layers`; e.g. 768 MB for SmolLM2-135M at layers 17 and 24 in fp16)."""
    return 1e6 / block_size * key_width(rc, llama, block_size) * key_dtype(rc).itemsize
