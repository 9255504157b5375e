"""Device mesh with axes ("data", "model") and the sharding rules for params and batches.

Rules (explicit `NamedSharding`s, never implicit placement):
- batches: leading (batch) axis on `data`;
- base params: attention/FFN input projections split their output features on `model`,
  output projections their input features (Megatron-style), the vocabulary axis of the
  embedding and LM head on `model`; norms replicated; the stacked layer axis never split.
A dimension that the mesh axis does not divide is left unsplit rather than padded, so any
config runs on any mesh (the rule is visible in `param_partition_specs`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mcjax.config import LlamaConfig, MeshConfig

AXES = ("data", "model")


def make_mesh(mesh_config: MeshConfig | tuple[int, int] = MeshConfig(),
              devices: list | None = None) -> Mesh:
    """Build a ("data", "model") mesh; a size of -1 takes all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = ((mesh_config.data, mesh_config.model)
                   if isinstance(mesh_config, MeshConfig) else mesh_config)
    n = len(devices)
    if model == -1 and data == -1:
        raise ValueError("at most one mesh axis may be -1")
    if model == -1:
        model = n // data
    if data == -1:
        data = n // model
    if data <= 0 or model <= 0 or data * model > n or n % model:
        raise ValueError(f"mesh (data={data}, model={model}) does not fit {n} devices")
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, AXES)


def _split_if_divisible(size: int, mesh: Mesh, axis: str) -> str | None:
    return axis if size % mesh.shape[axis] == 0 else None


# (module, leaf) -> which dim (counted from the end) goes on `model`
_MODEL_DIM = {
    ("embed", "embedding"): -2,  # [V, D]: vocab
    ("lm_head", "kernel"): -1,  # [D, V]: vocab
    ("q_proj", "kernel"): -1,
    ("k_proj", "kernel"): -1,
    ("v_proj", "kernel"): -1,
    ("gate_proj", "kernel"): -1,
    ("up_proj", "kernel"): -1,
    ("o_proj", "kernel"): -2,
    ("down_proj", "kernel"): -2,
    # biases of the column-split projections follow their output features; o/down biases
    # (added after the all-reduce) and q/k norms ([head_dim]) stay replicated
    ("q_proj", "bias"): -1,
    ("k_proj", "bias"): -1,
    ("v_proj", "bias"): -1,
    ("gate_proj", "bias"): -1,
    ("up_proj", "bias"): -1,
}


def param_partition_specs(params: Any, mesh: Mesh) -> Any:
    """PartitionSpec for every base-model param (pytree of arrays or ShapeDtypeStructs)."""

    def spec(path, leaf):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        dim = _MODEL_DIM.get(keys[-2:])
        axes: list[str | None] = [None] * leaf.ndim
        if dim is not None:
            axes[dim] = _split_if_divisible(leaf.shape[dim], mesh, "model")
        return P(*axes)

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(params, mesh))


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Place params on the mesh according to the rules."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Leading axis on `data` (unsplit if `batch_size` is given and not divisible)."""
    lead = "data" if batch_size is None else _split_if_divisible(batch_size, mesh, "data")
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def logits_sharding(mesh: Mesh, batch_size: int, vocab_size: int) -> NamedSharding:
    """Logits [B, T, V]: batch on `data`, vocabulary on `model` (each where divisible)."""
    return NamedSharding(mesh, P(_split_if_divisible(batch_size, mesh, "data"), None,
                                 _split_if_divisible(vocab_size, mesh, "model")))
