"""Orbax checkpoints of trainable state, data position and config.

A checkpoint holds the `TrainState` (trainable params, optimizer state, step), the data
iterator's position and the experiment config as JSON. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save resumes from
the last complete step. Restoring into a config whose architecture differs (base model,
GistNet, LensNet, block size) is a `CheckpointMismatchError` naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mcjax.config import ExperimentConfig


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing or unreadable."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written for a different architecture than the one asked for."""


def config_to_json(cfg: ExperimentConfig) -> dict:
    return config_to_json_section(cfg)


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


def config_to_json_section(section: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(section)))


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
        meta = {"config": config_to_json(cfg), "data_position": data_position,
                "extra": extra or {}}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, cfg: ExperimentConfig, step: int | None = None
                ) -> tuple[Any, dict]:
        """(state, meta) of `step` (default latest), checked against `cfg` first."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        check_compatible(self.read_meta(step)["config"], cfg, f"{self.directory}/{step}",
                         nets_in(abstract_state))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
