"""The device view of MegaContext trees, and the one way tree rows reach it.

A `TreeView` holds every level of a tree in fixed-capacity device arrays for jitted
gathers. Rows get there in two steps, whoever uploads: `view_update(trees, synced)` gathers
on the host the rows each tree gained since the view held `synced` rows per level, padded
to row counts bucketed to powers of two (so a stream of appends compiles few shapes), and
the pure `write_view(view, *update)` scatters them into the arrays on the device. Both work
on a batch of streams (leading axis B): the runtime jits `write_view` with the view donated
(`mcjax.runtime.programs`), and `MegaContextTree.view()` is the same with B = 1.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TreeView", "view_update", "write_view", "bucket_rows"]

_MIN_GIST_ROWS = 8  # smallest row bucket of a gist level's update (one compile serves all)


@flax.struct.dataclass
class TreeView:
    """Device-side view of the tree for jitted gathers.

    Every level is a fixed-capacity array; rows at or beyond `counts[level]` are padding
    (zeros) and must never be read as content. A leading batch axis may be added (vmap).
    """

    tokens: jax.Array  # [C0] int32 LOD0 token ids
    gists: tuple[jax.Array, ...]  # gists[l - 1]: [C_l, D] gists of level l = 1..num_levels
    counts: jax.Array  # [num_levels + 1] int32 number of valid entries per level
    # [C1, width] retrieval keys per LOD1 block (`mcjax.retrieval`), or None (not kept);
    # valid rows: counts[1]
    keys: jax.Array | None = None

    @property
    def num_levels(self) -> int:
        return len(self.gists)

    def capacity(self, level: int) -> int:
        """Rows of the fixed-capacity array of `level` (0 = tokens)."""
        return self.tokens.shape[-1] if level == 0 else self.gists[level - 1].shape[-2]


def bucket_rows(n: int, minimum: int) -> int:
    """Rows that hold `n`: the next power of two, at least `minimum` (a bounded set of
    shapes, so jitted consumers compile a few times, not once per length)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def view_update(trees: Sequence, synced) -> tuple | None:
    """The arguments of `write_view` that bring a view of B = len(trees) streams holding
    `synced` [B, L+1] rows per stream and level up to the trees' counts (`trees[b]`: the
    `MegaContextTree` of stream b), or None when nothing is new.

    Host arrays: `(token_rows [B, R0] int32, gist_rows (per level [B, R_l, D]), start [B,
    L+1], count [B, L+1], counts [B, L+1], key_rows [B, R_1, width] or None)`, gists and
    keys in the trees' storage dtypes; the rows of each level are padded to a power of two
    (at least a block of tokens, `_MIN_GIST_ROWS` gists), the same for every stream. The
    retrieval keys, when the trees keep them, share LOD1's rows. `counts` is what the view
    holds after the write (the next call's `synced`)."""
    counts = np.asarray([t.counts for t in trees], np.int64)
    synced = np.asarray(synced, np.int64)
    new = counts - synced
    if not new.any():
        return None
    first = trees[0]
    B, K = len(trees), first.mc.block_size
    token_rows = np.zeros((B, bucket_rows(new[:, 0].max(), K)), np.int32)
    gist_rows = [np.zeros((B, bucket_rows(new[:, l].max(), _MIN_GIST_ROWS), store.width),
                          store.dtype)
                 for l, store in enumerate(first.stores[1:], start=1)]
    key_rows = None
    if first.has_keys:
        key_rows = np.zeros((B, gist_rows[0].shape[1], first.key_store.width),
                            first.key_store.dtype)
    for b, tree in enumerate(trees):
        lo, hi = synced[b], counts[b]
        token_rows[b, :new[b, 0]] = tree.tokens(lo[0], hi[0])
        for l in range(1, len(gist_rows) + 1):
            gist_rows[l - 1][b, :new[b, l]] = tree.gists(l, lo[l], hi[l])
        if key_rows is not None:
            key_rows[b, :new[b, 1]] = tree.keys(lo[1], hi[1])
    return (token_rows, tuple(gist_rows), synced.astype(np.int32), new.astype(np.int32),
            counts.astype(np.int32), key_rows)


def _scatter_rows(buf, rows, start, count):
    """buf[b, start[b] + i] = rows[b, i] for i < count[b] (other rows dropped)."""
    B, R = rows.shape[:2]
    i = jnp.arange(R)[None, :]
    idx = jnp.where(i < count[:, None], start[:, None] + i, buf.shape[1])  # out of range: dropped
    return buf.at[jnp.arange(B)[:, None], idx].set(rows.astype(buf.dtype), mode="drop")


def write_view(view: TreeView, token_rows, gist_rows, start, count, counts, key_rows=None
               ) -> TreeView:
    """Write each stream's new tree rows (`view_update`) into the batched fixed-capacity
    view (retrieval keys, when kept, share LOD1's rows)."""
    tokens = _scatter_rows(view.tokens, token_rows, start[:, 0], count[:, 0])
    gists = tuple(_scatter_rows(g, r, start[:, l + 1], count[:, l + 1])
                  for l, (g, r) in enumerate(zip(view.gists, gist_rows)))
    keys = view.keys
    if key_rows is not None:
        keys = _scatter_rows(view.keys, key_rows, start[:, 1], count[:, 1])
    return TreeView(tokens=tokens, gists=gists, counts=counts, keys=keys)
