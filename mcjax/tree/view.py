"""The device view of a MegaContext tree: every level in a fixed-capacity array for jitted
gathers (`MegaContextTree.view()` fills one)."""

from __future__ import annotations

import flax.struct
import jax

__all__ = ["TreeView"]


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
