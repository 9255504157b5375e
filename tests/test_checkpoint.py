"""Training checkpoints (mcjax.checkpoint.Checkpointer): a damaged latest checkpoint is
skipped for the newest intact one, and the skip is reported (issue 33, build item 5)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.checkpoint import CheckpointDamagedError, Checkpointer
from mcjax.config import get_config


def _state(k):
    return {"w": jnp.arange(4096, dtype=jnp.float32) * k, "b": jnp.full((3, 5), k, jnp.bfloat16),
            "step": jnp.int32(k)}


def _saved(workdir, steps=(1, 2, 3)):
    cfg = get_config("tiny")
    ckpt = Checkpointer(workdir)
    for k in steps:
        ckpt.save(k, _state(k), {"position": k}, cfg)
    ckpt.wait()
    return ckpt, cfg


def _data_files(step_dir):
    return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()
                   and "d" in p.parent.name), key=lambda p: -p.stat().st_size)


def _flip_every_data_file(step_dir):
    for f in _data_files(step_dir):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))


def _damage(step_dir, how):
    if how == "flipped":  # silent garbage for orbax unless the state is checked
        _flip_every_data_file(step_dir)
    elif how == "truncated":
        for f in _data_files(step_dir):
            f.write_bytes(f.read_bytes()[:10])
    elif how == "state_missing":
        shutil.rmtree(step_dir / "state")
    elif how == "meta_damaged":
        (step_dir / "meta" / "metadata").write_text("{not json")


@pytest.mark.parametrize("how", ["flipped", "truncated", "state_missing", "meta_damaged"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how):
    ckpt, cfg = _saved(tmp_path)
    _damage(ckpt.directory / "3", how)
    ckpt.close()
    ckpt = Checkpointer(tmp_path)
    state, meta, step, skipped = ckpt.restore_intact(_state(0), cfg)
    assert step == 2 and meta["data_position"] == {"position": 2}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
                 jax.device_get(_state(2)))
    assert [s for s, _ in skipped] == [3] and skipped[0][1]
    ckpt.close()


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    ckpt, cfg = _saved(tmp_path, (1, 2))
    for k in (1, 2):
        _damage(ckpt.directory / str(k), "flipped")
    with pytest.raises(CheckpointDamagedError, match="step 2: .*step 1: "):
        ckpt.restore_intact(_state(0), cfg)
    ckpt.close()


def test_restore_of_a_named_damaged_step_is_a_clear_error(tmp_path):
    ckpt, cfg = _saved(tmp_path, (1, 2))
    _damage(ckpt.directory / "2", "flipped")
    with pytest.raises(CheckpointDamagedError, match="checkpoints/2: unreadable"):
        ckpt.restore(_state(0), cfg, 2)
    state, _ = ckpt.restore(_state(0), cfg, 1)
    assert int(state["step"]) == 1
    assert json.loads(json.dumps(ckpt.read_meta(1)["state_fingerprint"]))
    ckpt.close()
