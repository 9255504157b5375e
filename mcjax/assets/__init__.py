"""Params-only network files (SPEC §2.10): `<name>.safetensors` plus a JSON card beside it.

A file holds one network's params (GistNet or LensNet), no optimizer state: the nested
param dict flattened to "a/b/c" keys, written with `safetensors.numpy`. The card
`<name>.json` says what the params mean:

    {"format": "mcjax-params-v1", "part": "gist",
     "config": {"base": "smollm2-135m", "gist": {<GistConfig fields>},
                "mc": {<MCConfig fields>, at least block_size and num_levels}, ...},
     ...anything else: "source", "step", "command", "data", "figures"}

`config` is `mcjax.config.config_to_json(cfg)` of the training config (only "gist" and
"mc" are required). Shipped networks live in this package directory (SPEC §2.10:
`SHIPPED_GIST`, `SHIPPED_LENS`); any other path works the same way. This module is the
format only: which params a session or an evaluation runs with, checked against its
config, is `mcjax.nets` (shipped, a params file, a training workdir or untrained).

- `save_params_safetensors(params, path)` / `load_params_safetensors(path)`: the arrays.
- `write_card` / `read_card`: the card (`card_path(path)` is where it lies); `write_card`
  records the file's "sha256", and `load_params_safetensors` refuses a file that differs
  from it (`verify_params_file`: a flipped byte is an AssetError naming the file).
- `save_gist_params(params, cfg, path, **card)`: both at once.
- `gist_config_from_card` / `lens_config_from_card`: a card's net configs (with its
  serving changes); `apply_card(cfg, card)`: the experiment config with the card's GistNet
  architecture (checked: same base model, block size and number of levels).

Errors are `AssetError` (a `CheckpointError`: the CLIs report both the same way).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mcjax.config import ExperimentConfig, GistConfig, LensConfig, config_to_json
from mcjax.errors import CheckpointError, CheckpointMismatchError

__all__ = ["flatten_params", "unflatten_params", "AssetError", "FORMAT", "ASSET_DIR",
           "SHIPPED_GIST", "SHIPPED_LENS",
           "save_params_safetensors", "load_params_safetensors", "card_path", "read_card",
           "write_card", "sha256_file", "verify_params_file", "save_gist_params",
           "gist_config_from_card", "lens_config_from_card", "apply_card"]

FORMAT = "mcjax-params-v1"
ASSET_DIR = Path(__file__).resolve().parent  # shipped params + cards
# The nets that ship with the package (SPEC §2.10), trained for the smollm2_135m configs'
# base model and architectures; their cards give the command, data and figures.
SHIPPED_GIST = ASSET_DIR / "gistnet_smollm2_135m.safetensors"
SHIPPED_LENS = ASSET_DIR / "lensnet_smollm2_135m.safetensors"
_SEP = "/"


class AssetError(CheckpointError):
    """A params file or its card is missing, unreadable or does not fit the config."""


# --------------------------------------------------------------------------- arrays


def flatten_params(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a/b/c": host array} of a nested dict of arrays (`unflatten_params` inverts it)."""
    if hasattr(tree, "items"):  # dict / FrozenDict
        out: dict[str, np.ndarray] = {}
        for k, v in tree.items():
            k = str(k)
            if not k or _SEP in k:
                raise AssetError(f"param name {k!r} under {prefix or '/'!r} is empty or holds "
                                 f"{_SEP!r}; cannot flatten it")
            out.update(flatten_params(v, f"{prefix}{k}{_SEP}"))
        return out
    if not prefix:
        raise AssetError("params must be a (nested) dict of arrays")
    return {prefix[:-1]: np.asarray(tree, order="C")}  # (ascontiguousarray makes 0-d 1-d)


def save_params_safetensors(params: Any, path: str | os.PathLike,
                            metadata: dict[str, str] | None = None,
                            dtype: str | None = None) -> Path:
    """Write a nested dict of arrays as safetensors with "a/b/c" keys (atomic rename);
    `dtype` (e.g. "float16": half the bytes of a shipped file) casts floating arrays."""
    from safetensors.numpy import save_file

    path = Path(path)
    flat = flatten_params(params)
    if dtype is not None:
        flat = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v
                for k, v in flat.items()}
    if not flat:
        raise AssetError("no arrays to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, os.fspath(tmp), metadata={"format": FORMAT, **(metadata or {})})
    os.replace(tmp, path)
    return path


def load_params_safetensors(path: str | os.PathLike) -> dict:
    """The nested dict of numpy arrays written by `save_params_safetensors` (floating
    arrays as float32, whatever precision they were stored in), after checking the file
    against the sha256 its card records (`verify_params_file`)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise AssetError(f"params file {str(path)!r} does not exist")
    verify_params_file(path)  # the sha256 its card records, before reading anything
    try:
        flat = load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AssetError(f"cannot read params file {path}: {e}") from e
    return unflatten_params(
        {k: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
         for k, a in flat.items()}, str(path))


def unflatten_params(flat: dict[str, Any], where: str = "params") -> dict:
    """The nested dict `flatten_params` made "a/b/c" keys from."""
    tree: dict = {}
    for key in sorted(flat):
        node = tree
        *parents, leaf = key.split(_SEP)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise AssetError(f"{where}: key {key!r} nests under an array")
        node[leaf] = flat[key]
    return tree


# --------------------------------------------------------------------------- cards


def card_path(path: str | os.PathLike) -> Path:
    """`<name>.json` beside `<name>.safetensors`."""
    return Path(path).with_suffix(".json")


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_card(path: str | os.PathLike, card: dict) -> Path:
    """Write the card beside params file `path`, recording the file's sha256 (which
    `load_params_safetensors` checks) when the file exists."""
    out = card_path(path)
    if Path(path).is_file():
        card = {**card, "sha256": sha256_file(path)}
    out.write_text(json.dumps(card, indent=2) + "\n")
    return out


def verify_params_file(path: str | os.PathLike) -> None:
    """The params file has the sha256 its card records (nothing to check without a card
    or without a recorded sha256): else AssetError naming the file."""
    cp = card_path(path)
    if not cp.is_file():
        return
    try:
        want = json.loads(cp.read_text()).get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise AssetError(f"card {cp} is not a valid JSON object: {e}") from e
    if want is None:
        return
    got = sha256_file(path)
    if got != want:
        raise AssetError(f"params file {path} is damaged or was replaced: its sha256 "
                         f"{got[:16]}… differs from the {str(want)[:16]}… its card {cp.name} "
                         f"records; restore the file (for a shipped one: reinstall mcjax)")


def read_card(path: str | os.PathLike) -> dict:
    """The card beside a params file; it must hold "config" with "gist" and "mc" dicts."""
    cp = card_path(path)
    if not cp.is_file():
        raise AssetError(f"no card {str(cp)!r} beside {path} (a JSON file with the training "
                         f"config: {{\"config\": {{\"gist\": {{...}}, \"mc\": {{...}}}}}})")
    try:
        card = json.loads(cp.read_text())
    except json.JSONDecodeError as e:
        raise AssetError(f"card {cp} is not valid JSON: {e}") from e
    config = card.get("config") if isinstance(card, dict) else None
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict)
                                               for k in ("gist", "mc")):
        raise AssetError(f"card {cp} needs a \"config\" object with \"gist\" and \"mc\" objects")
    return card


# --------------------------------------------------------------------------- configs


def _section_config(card: dict, section: str, cls):
    """The card's `config[section]` as a `cls` config, with the card's `serving` changes
    applied (AssetError if absent or invalid).

    `config` is what the params were trained with; a card may add `serving`: {"config":
    {section: {field: value}}, "why": ...} — settings the params are served with instead,
    each changed by a measurement the card records (e.g. the read pass's chunk, unified
    for one read pass), so the params fit the configs that use them."""
    given = card["config"].get(section)
    if given is None:
        raise AssetError(f"the card has no {section} config")
    served = ((card.get("serving") or {}).get("config") or {}).get(section) or {}
    given = {**given, **served}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise AssetError(f"card's {section} config has unknown fields {unknown}")
    try:
        return cls(**given)
    except (TypeError, ValueError) as e:
        raise AssetError(f"card's {section} config is invalid: {e}") from e


def gist_config_from_card(card: dict) -> GistConfig:
    return _section_config(card, "gist", GistConfig)


def apply_card(cfg: ExperimentConfig, card: dict) -> ExperimentConfig:
    """`cfg` with the card's GistNet architecture. The card must be for the same base model
    (when it names one), block size and number of levels: else CheckpointMismatchError."""
    config = card["config"]
    diffs = []
    if config.get("base") is not None and config["base"] != cfg.base:
        diffs.append(f"base: card {config['base']!r} vs session {cfg.base!r}")
    for k in ("block_size", "num_levels"):
        theirs, ours = config["mc"].get(k), getattr(cfg.mc, k)
        if theirs is not None and theirs != ours:
            diffs.append(f"mc.{k}: card {theirs!r} vs session {ours!r}")
    if diffs:
        raise CheckpointMismatchError("the params card was written for another setup:\n  "
                                      + "\n  ".join(diffs))
    return dataclasses.replace(cfg, gist=gist_config_from_card(card))


def save_gist_params(params: Any, cfg: ExperimentConfig, path: str | os.PathLike,
                     **card: Any) -> tuple[Path, Path]:
    """Write GistNet params and their card (config = `cfg`, plus the `card` entries)."""
    out = save_params_safetensors(params, path, {"part": "gist"})
    return out, write_card(out, {"format": FORMAT, "part": "gist",
                                 "config": config_to_json(cfg), **card})


def lens_config_from_card(card: dict) -> LensConfig:
    return _section_config(card, "lens", LensConfig)
