"""Which GistNet / LensNet an evaluation uses, and where they came from.

A training workdir tells by its checkpoint metadata which nets it holds: `train_gist` →
GistNet (LensNet stays untrained), `train_lens` → LensNet (its GistNet is the one it was
trained on, when that can be found), `train_joint` → both. Explicit `gist_checkpoint` /
`lens_checkpoint` take precedence; with nothing given the shipped GistNet and (when one
fits the config) the shipped LensNet are used; `untrained=True` evaluates the untrained nets on
purpose. `gist_params` is a params-only GistNet file (`mcjax.assets`: `<name>.safetensors`
with its `<name>.json` card); the config must already carry the card's GistNet
architecture (`mcjax.assets.apply_card`, which `pipeline.validate` applies). Loading
goes through `mcjax.checkpoint.load_trained_params`, so a checkpoint of another base model
or architecture is a `CheckpointMismatchError` naming the fields, and a missing directory
or one without a complete checkpoint a `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from mcjax.checkpoint import (CheckpointError, Checkpointer, lens_gistnet, load_trained_params,
                              untrained_params)
from mcjax.config import ExperimentConfig

__all__ = ["Networks", "checkpoint_parts", "resolve_networks"]

_RUN_PARTS = {"train_gist": ("gist",), "train_lens": ("lens",), "train_joint": ("gist", "lens")}


@dataclasses.dataclass
class Networks:
    gist: Any  # GistNet params the MegaContext methods use
    lens: Any  # LensNet params
    untrained_gist: Any  # the GistNet training starts from (ΔNLL baseline)
    sources: dict[str, dict]  # "gist" / "lens" / "untrained_gist" -> provenance

    @property
    def untrained(self) -> tuple[str, ...]:
        """Nets the methods use untrained ("gist", "lens")."""
        return tuple(p for p in ("gist", "lens") if self.sources[p]["source"] == "untrained")


def checkpoint_parts(workdir: str | os.PathLike) -> tuple[str, tuple[str, ...]]:
    """(run kind, nets it holds) of a training workdir's latest checkpoint."""
    path = Path(workdir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    ckpt = Checkpointer(path, create=False)
    try:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"no complete checkpoint under {path}")
        run = (ckpt.read_meta().get("extra") or {}).get("run") or "train_gist"
    finally:
        ckpt.close()
    if run not in _RUN_PARTS:
        raise CheckpointError(f"checkpoint {path} comes from an unknown run {run!r}")
    return run, _RUN_PARTS[run]


def _load_gist_file(path, cfg: ExperimentConfig) -> tuple[Any, dict]:
    """(params, provenance) of an explicit params-only GistNet file; the config must
    already carry its card's GistNet (an evaluation applies the card first)."""
    from mcjax import assets

    if assets.gist_config_from_card(assets.read_card(path)) != cfg.gist:
        raise ValueError(f"the config's GistNet differs from the card of {path}: apply the "
                         f"card first (mcjax.assets.apply_card)")
    return assets.load_params_file(path, cfg, "gist", f"GistNet params in {path}")


def resolve_networks(cfg: ExperimentConfig, base_params, *, checkpoint=None,
                     gist_checkpoint=None, lens_checkpoint=None, gist_params=None,
                     untrained: bool = False) -> Networks:
    """GistNet and LensNet params (and the untrained GistNet baseline) with provenance.

    `cfg.base_config` must be set. Raises CheckpointError / CheckpointMismatchError (see the
    module docstring) and ValueError for contradictory or missing choices.
    """
    given = [x for x in (checkpoint, gist_checkpoint, lens_checkpoint, gist_params)
             if x is not None]
    if gist_params is not None and gist_checkpoint is not None:
        raise ValueError("give --gist-params or --gist-checkpoint, not both")
    if untrained and given:
        raise ValueError("--untrained evaluates untrained nets: do not combine it with "
                         "checkpoints")
    shipped = None
    if not untrained and not given:
        from mcjax.assets import shipped_gist

        shipped = shipped_gist(cfg)
        if shipped is None:
            raise ValueError("no checkpoint given and no shipped GistNet fits this config: "
                             "pass --checkpoint DIR (a train_gist / train_lens / train_joint "
                             "workdir), --gist-checkpoint / --lens-checkpoint, --gist-params "
                             "FILE.safetensors, or --untrained to evaluate untrained nets")
    gist_dir, lens_dir = gist_checkpoint, lens_checkpoint
    notes = {}
    if checkpoint is not None:
        run, parts = checkpoint_parts(checkpoint)
        notes = {"checkpoint_run": run}
        if "gist" in parts and gist_dir is None:
            gist_dir = checkpoint
        if "lens" in parts and lens_dir is None:
            lens_dir = checkpoint
    for d in (gist_dir, lens_dir):
        if d is not None:
            checkpoint_parts(d)  # clear error for a missing / empty directory

    seed = cfg.train.seed
    sources: dict[str, dict] = {}
    shipped_l = None
    if shipped is not None:  # nothing given: the shipped LensNet too, when it fits
        from mcjax.assets import shipped_lens

        shipped_l = shipped_lens(cfg)
    if lens_dir is not None:
        lens, sources["lens"] = load_trained_params(lens_dir, cfg, "lens")
    elif shipped_l is not None:
        lens, sources["lens"] = shipped_l
    else:
        lens = untrained_params(cfg, "lens")
        sources["lens"] = {"source": "untrained", "seed": seed,
                           "why": "no LensNet checkpoint given"
                           + (f" ({checkpoint} is a {notes['checkpoint_run']} workdir)"
                              if checkpoint is not None else "")}
    gist = None
    if shipped is not None:
        gist, sources["gist"] = shipped
    elif gist_params is not None:
        gist, sources["gist"] = _load_gist_file(gist_params, cfg)
    elif gist_dir is not None:
        gist, sources["gist"] = load_trained_params(gist_dir, cfg, "gist")
    elif lens_dir is not None:  # the GistNet LensNet was trained with, if it can be found
        found = lens_gistnet(sources["lens"], cfg, base_params)
        if found is not None:
            gist, sources["gist"] = found
    if gist is not None:
        seed = sources["gist"].get("seed", seed)
    untrained_gist = untrained_params(cfg, "gist", base_params, seed=seed)
    if gist is None:
        gist = untrained_gist
        sources["gist"] = {"source": "untrained", "seed": seed,
                           "why": "no GistNet checkpoint given or found"}
    sources["untrained_gist"] = {"source": "untrained", "seed": seed,
                                 "why": "baseline: the GistNet training starts from (same "
                                        "seed and init)"}
    for k, v in notes.items():
        sources.setdefault("notes", {})[k] = v
    return Networks(gist=gist, lens=lens, untrained_gist=untrained_gist, sources=sources)
