"""Orbax checkpoints of trainable state, data position and config.

A checkpoint holds the `TrainState` (trainable params, optimizer state, step), the data
iterator's position and the experiment config as JSON. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save resumes from
the last complete step. Restoring into a config whose architecture differs (base model,
GistNet, LensNet, block size) is a `CheckpointMismatchError` naming the fields.

`restore_trained_params` reads a workdir's trainable params alone, as a raw tree (no
optimizer needed): `mcjax.nets` resolves the nets of sessions and evaluations from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mcjax.config import ExperimentConfig, config_to_json, config_to_json_section
from mcjax.errors import CheckpointError, CheckpointMismatchError


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's files are unreadable or its state differs from what was saved."""


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _leaf_hashes(leaves: list) -> list:
    """Two 32-bit position-weighted sums of each leaf's bits (integer arithmetic: exact
    and the same on every device and sharding, unlike a float reduction)."""
    out = []
    for x in leaves:
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
        u = u.reshape(-1)
        i = jnp.arange(u.shape[0], dtype=jnp.uint32)
        a = u * (i * jnp.uint32(2654435761) + jnp.uint32(1))
        a = a ^ (a >> 15)
        b = ((u ^ (u >> 7)) * jnp.uint32(0x27D4EB2F) + i) * jnp.uint32(0x165667B1)
        b = b ^ (b >> 13)
        out.append(jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)]))
    return out


def tree_fingerprint(tree: Any) -> str:
    """A hash of a pytree's arrays — names, shapes, dtypes and every bit of the values —
    computed where the arrays live (one pass, two integer sums per leaf: ~no transfer; not
    cryptographic: it tells weights apart, it does not resist forgery). Used for the base
    model's weights in a session save and for a training checkpoint's state."""
    import hashlib

    import numpy as np

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    device, host = [], []
    for path, leaf in leaves:
        itemsize = getattr(getattr(leaf, "dtype", None), "itemsize", None)
        (device if itemsize in _UINT or getattr(leaf, "dtype", None) == bool else host
         ).append((path, leaf))
    h = hashlib.sha256()
    sums = jax.device_get(_leaf_hashes([jnp.asarray(x) for _, x in device])) if device else []
    for (path, leaf), pair in zip(device, sums):
        h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|"
                 f"{int(pair[0])},{int(pair[1])};".encode())
    for path, leaf in host:  # 8-byte or non-array leaves: hashed on the host
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()[:32]


NETS = ("gist", "lens")


def architecture_of(cfg_json: dict, nets: tuple[str, ...] = NETS) -> dict:
    """The config fields that fix parameter shapes and meaning, for the nets in `nets`."""
    arch = {
        "base": cfg_json.get("base"),
        "base_config": cfg_json.get("base_config"),
        "mc.block_size": (cfg_json.get("mc") or {}).get("block_size"),
        "mc.num_levels": (cfg_json.get("mc") or {}).get("num_levels"),
    }
    arch.update({net: cfg_json.get(net) for net in nets})
    return arch


def _with_defaults(saved_cfg_json: dict, cfg: ExperimentConfig) -> dict:
    """`saved_cfg_json` with the nets' fields it lacks set to today's dataclass defaults.

    A field added after a checkpoint was written is added with a default that keeps the old
    behaviour (e.g. `lens.query_tokens=0` is LensNet v1), so an old checkpoint means that.
    """
    out = dict(saved_cfg_json)
    for net in NETS:
        if isinstance(out.get(net), dict):
            defaults = config_to_json_section(type(getattr(cfg, net))())
            out[net] = {**defaults, **out[net]}
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r} vs requested {b!r}"]


def check_compatible(saved_cfg_json: dict, cfg: ExperimentConfig, where: str = "",
                     nets: tuple[str, ...] = NETS) -> None:
    """Raise `CheckpointMismatchError` naming every architecture field (of the base model,
    the block structure and the nets in `nets`) where the checkpoint and `cfg` differ."""
    saved = architecture_of(_with_defaults(saved_cfg_json, cfg), nets)
    diffs = _differences(saved, architecture_of(config_to_json(cfg), nets))
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {where} was written for a different architecture:\n  "
            + "\n  ".join(diffs))


def nets_in(state: Any) -> tuple[str, ...]:
    """The nets whose params a train state holds (`state.params` keyed by net), else all."""
    params = getattr(state, "params", None)
    if isinstance(params, dict) and set(params) & set(NETS):
        return tuple(n for n in NETS if n in params)
    return NETS


class Checkpointer:
    """Save / restore (state, data position, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3,
                 create: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints under {workdir}")
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=create))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_position: dict, cfg: ExperimentConfig,
             extra: dict | None = None) -> None:
        """Save `state` as `step` (asynchronously), with its fingerprint
        (`tree_fingerprint`) in the meta: a restore compares it, so damage that orbax
        reads without complaint is found too."""
        meta = {"config": config_to_json(cfg), "data_position": data_position,
                "extra": extra or {}}
        if jax.process_count() == 1:  # (a global array's hash needs every host's part)
            meta["state_fingerprint"] = tree_fingerprint(state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax / tensorstore / json errors of a damaged step
            raise CheckpointDamagedError(f"{self.directory}/{step}: unreadable meta "
                                         f"({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CheckpointDamagedError(f"{self.directory}/{step}: its meta holds no config")
        return meta

    def restore(self, abstract_state: Any, cfg: ExperimentConfig, step: int | None = None
                ) -> tuple[Any, dict]:
        """(state, meta) of `step` (default latest), checked against `cfg` first
        (`CheckpointMismatchError`) and against the fingerprint saved with it after
        (`CheckpointDamagedError`, as for unreadable files). `restore_intact` falls back
        to older steps instead."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        meta = self.read_meta(step)
        check_compatible(meta["config"], cfg, f"{self.directory}/{step}",
                         nets_in(abstract_state))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # orbax / tensorstore errors of damaged files
            raise CheckpointDamagedError(f"{self.directory}/{step}: unreadable state "
                                         f"({type(e).__name__}: {str(e)[:300]})") from e
        want = meta.get("state_fingerprint")
        if want is not None and jax.process_count() == 1:
            got = tree_fingerprint(state)
            if got != want:
                raise CheckpointDamagedError(
                    f"{self.directory}/{step}: the restored state differs from the one "
                    f"saved (fingerprint {got} != {want}): its files are damaged")
        return state, meta

    def restore_intact(self, abstract_state: Any, cfg: ExperimentConfig,
                       check_meta: Callable[[dict], None] | None = None
                       ) -> tuple[Any, dict, int, list[tuple[int, str]]]:
        """(state, meta, step, skipped) of the newest step that restores intact
        (`restore`), newest first; `skipped` lists (step, why) of the damaged newer ones.
        A config mismatch, or `check_meta(meta)` raising, is not damage: it propagates.
        Every step damaged: `CheckpointDamagedError` listing why."""
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except CheckpointDamagedError as e:
                skipped.append((step, str(e)))
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state, meta = self.restore(abstract_state, cfg, step)
            except CheckpointDamagedError as e:
                skipped.append((step, str(e)))
                continue
            return state, meta, step, skipped
        raise CheckpointDamagedError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in skipped) if skipped else
            f"no complete checkpoint in {self.directory}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_trained_params(workdir: str | os.PathLike, step: int | None = None, *,
                           check: Any = None, ema: bool = False) -> tuple[dict, dict, int]:
    """(trainable params by net, e.g. {"gist": ...}, checkpoint meta, step) of a training
    workdir's checkpoint `step` (default latest), restored as a raw tree (independent of the
    optimizer). `ema`: their moving average instead (a run with train.ema_decay > 0).
    `check(meta, step)` runs before the restore (to refuse a mismatch without reading the
    arrays). Raises CheckpointError for a missing directory, no complete checkpoint, or
    `ema` on a checkpoint that keeps no average."""
    path = Path(workdir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    ckpt = Checkpointer(path, create=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {path}")
        meta = ckpt.read_meta(step)
        if check is not None:
            check(meta, step)
        if ema and not float((meta.get("extra") or {}).get("ema_decay") or 0.0) > 0:
            raise CheckpointError(f"checkpoint {path} (step {step}) keeps no EMA of its params "
                                  f"(trained with train.ema_decay=0); drop the EMA option")
        raw = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
    finally:
        ckpt.close()
    key = "ema_params" if ema else "params"
    trained = (raw.get(key) or {}) if isinstance(raw, dict) else {}
    return trained, meta, int(step)
