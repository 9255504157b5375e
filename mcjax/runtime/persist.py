"""On-disk pieces of a saved session (`Session.save` / `Session.load`): arrays as raw bytes
(bit-exact for every dtype) with a manifest, and durable file writes (durable directory
entries: `mcjax.base.convert.fsync_dir`, shared with the model conversion)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAVE_FORMAT = "mcjax-session"
SAVE_VERSION = 1


def keyed_leaves(tree) -> tuple[dict[str, np.ndarray], Any]:
    """({keystr path: host array} of a pytree's leaves, its treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}, treedef


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Arrays as raw bytes in one .npz (bit-exact for every dtype, bfloat16 included);
    returns the manifest (name -> dtype, shape) that `read_arrays` needs."""
    manifest, raw = {}, {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.asarray(a, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        manifest[name] = {"key": f"a{i}", "dtype": str(a.dtype), "shape": list(a.shape)}
        raw[f"a{i}"] = a.reshape(-1).view(np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **raw)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_arrays(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[m["key"]].view(jnp.dtype(m["dtype"])).reshape(tuple(m["shape"]))
                for name, m in manifest.items()}


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
