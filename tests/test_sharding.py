"""Sharding over an 8-device CPU mesh: same numbers as one device, declared placements."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mcjax import sharding
from mcjax.base import model as base
from mcjax.config import MeshConfig


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("tests need 8 host devices (tests/conftest.py sets XLA_FLAGS)")
    return sharding.make_mesh(MeshConfig(data=2, model=4))


def test_mesh_has_data_and_model_axes(mesh):
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert sharding.make_mesh(MeshConfig(data=-1, model=2)).shape["data"] == jax.device_count() // 2
    with pytest.raises(ValueError, match="does not fit"):
        sharding.make_mesh(MeshConfig(data=3, model=4))


def test_param_rules_split_features_on_model_and_never_layers(tiny_llama, mesh):
    config, params = tiny_llama
    specs = sharding.param_partition_specs(params, mesh)
    assert specs["layers"]["q_proj"]["kernel"] == P(None, None, "model")
    assert specs["layers"]["o_proj"]["kernel"] == P(None, "model", None)
    assert specs["layers"]["down_proj"]["kernel"] == P(None, "model", None)
    assert specs["layers"]["input_norm"]["scale"] == P(None, None)
    # vocab 263 is not divisible by 4: left unsplit rather than padded
    assert specs["embed"]["embedding"] == P(None, None)
    assert specs["lm_head"]["kernel"] == P(None, None)


def test_sharded_forward_equals_single_device_and_has_declared_shardings(tiny_llama, mesh):
    config, params = tiny_llama
    B, T = 4, 13
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = jnp.asarray(rng.random((B, T)) < 0.8)
    single = base.forward(params, config, tokens=tokens, positions=positions, mask=mask)

    sharded_params = sharding.shard_params(params, mesh)
    declared = sharding.param_shardings(params, mesh)
    for leaf, want in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(declared)):
        assert leaf.sharding == want
    q = sharded_params["layers"]["q_proj"]["kernel"]
    assert len({s.data.shape for s in q.addressable_shards}) == 1
    assert q.addressable_shards[0].data.shape == (3, 44, 48 // 4)

    fwd = base.make_sharded_forward(config, mesh, params, B)
    batch = sharding.batch_sharding(mesh, 2)
    out = fwd(sharded_params, jax.device_put(tokens, batch), jax.device_put(positions, batch),
              jax.device_put(mask, batch))
    assert out.sharding.spec == P("data", None, None)
    assert out.sharding.mesh.shape == mesh.shape
    assert out.addressable_shards[0].data.shape == (B // 2, T, config.vocab_size)
    chex.assert_trees_all_close(np.asarray(out), np.asarray(single), atol=1e-5)
