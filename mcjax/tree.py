"""MegaContext tree: append-only hierarchical store of the whole history (SPEC §2.3)."""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class TreeView:
    """Device-side view of the tree for jitted gathers.

    Every level is a fixed-capacity array; rows at or beyond `counts[level]` are padding
    (zeros) and must never be read as content. A leading batch axis may be added (vmap).
    """

    tokens: jax.Array  # [C0] int32 LOD0 token ids
    gists: tuple[jax.Array, ...]  # gists[l - 1]: [C_l, D] gists of level l = 1..num_levels
    counts: jax.Array  # [num_levels + 1] int32 number of valid entries per level
