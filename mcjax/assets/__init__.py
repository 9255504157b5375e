"""Params-only network files (SPEC §2.10): `<name>.safetensors` plus a JSON card beside it.

A file holds one network's params (GistNet or LensNet), no optimizer state: the nested
param dict flattened to "a/b/c" keys, written with `safetensors.numpy`. The card
`<name>.json` says what the params mean:

    {"format": "mcjax-params-v1", "part": "gist",
     "config": {"base": "smollm2-135m", "gist": {<GistConfig fields>},
                "mc": {<MCConfig fields>, at least block_size and num_levels}, ...},
     ...anything else: "source", "step", "command", "data", "figures"}

`config` is `mcjax.checkpoint.config_to_json(cfg)` of the training config (only "gist" and
"mc" are required). Shipped networks live in this package directory (SPEC §2.10); any
other path works the same way.

- `save_params_safetensors(params, path)` / `load_params_safetensors(path)`: the arrays.
- `write_card` / `read_card`: the card (`card_path(path)` is where it lies); `write_card`
  records the file's "sha256", and `load_params_safetensors` refuses a file that differs
  from it (`verify_params_file`: a flipped byte is an AssetError naming the file).
- `save_gist_params(params, cfg, path, **card)`: both at once.
- `export_gist_params(workdir, path)`: a training workdir's latest GistNet → file + card.
- `apply_card(cfg, card)`: the experiment config with the card's GistNet architecture
  (checked: same base model, block size and number of levels).
- `check_gist_params(params, cfg)`: the param tree matches that architecture.
- `load_params_file(path, cfg, part)`: a file's params checked against `cfg`, with their
  provenance (`params_file_source`) — the one loader of every `--*-params FILE` option.

Errors are `AssetError` (a `CheckpointError`: the CLIs report both the same way).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mcjax.checkpoint import CheckpointError, CheckpointMismatchError, config_to_json
from mcjax.config import ExperimentConfig, GistConfig, LensConfig

__all__ = ["flatten_params", "unflatten_params", "AssetError", "FORMAT", "ASSET_DIR",
           "save_params_safetensors", "load_params_safetensors", "card_path", "read_card",
           "write_card", "sha256_file", "verify_params_file",
           "save_gist_params", "export_gist_params", "gist_config_from_card", "apply_card",
           "check_gist_params", "SHIPPED_GIST", "shipped_gist", "SHIPPED_LENS",
           "lens_config_from_card", "check_lens_params", "shipped_lens", "expected_params",
           "check_params", "params_file_source", "load_params_file"]

FORMAT = "mcjax-params-v1"
ASSET_DIR = Path(__file__).resolve().parent  # shipped params + cards
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


# --------------------------------------------------------------------------- GistNet


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


def expected_params(cfg: ExperimentConfig, part: str):
    """The abstract param tree (shapes) of `part` ("gist" | "lens") for `cfg`
    (base_config set): what the trainers' init makes."""
    import jax

    D = cfg.base_config.hidden_size
    if part == "gist":
        from mcjax.gist import init_gist_params

        return jax.eval_shape(lambda k: init_gist_params(cfg.gist, D, k,
                                                         block_size=cfg.mc.block_size),
                              jax.random.key(0))
    if part == "lens":
        from mcjax.lens import init_lens

        return jax.eval_shape(lambda k: init_lens(cfg.lens, cfg.mc, D, k), jax.random.key(0))
    raise ValueError(f"part must be 'gist' or 'lens', got {part!r}")


def check_params(params: Any, cfg: ExperimentConfig, part: str, what: str | None = None,
                 exc: type[Exception] = CheckpointMismatchError) -> None:
    """`params` have the param names and shapes of `part` for `cfg` (`expected_params`),
    else `exc` naming what is missing, unexpected or of the wrong shape."""
    import jax

    name = {"gist": "GistNet", "lens": "LensNet"}.get(part, part)
    shapes = lambda tree, f: {_key(p): tuple(f(v))  # noqa: E731
                              for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = shapes(expected_params(cfg, part), lambda v: v.shape)
    got = shapes(params, np.shape)
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        wrong = [f"{k}: {got[k]} != {want[k]}" for k in sorted(want)
                 if k in got and got[k] != want[k]][:3]
        raise exc(f"{what or part + ' params'} do not match the configured {name} (missing "
                  f"{missing}, unexpected {extra}, wrong shapes {wrong})")


def check_gist_params(params: Any, cfg: ExperimentConfig, what: str = "gist params") -> None:
    """Same param names and shapes as `init_gist_params` for `cfg` (base_config set)."""
    check_params(params, cfg, "gist", what)


def _key(path) -> str:
    return _SEP.join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def params_file_source(path: str | os.PathLike, card_required: bool = True) -> dict:
    """Provenance of a params-only file: its path and card, the step and training seed
    the card records, and the card's own source, command and data. A missing card is an
    AssetError unless `card_required=False` (a bare warm start: `"card": None`, no step)."""
    src = {"source": "params_file", "path": str(Path(path).absolute()), "card": None,
           "step": None}
    if not card_required and not card_path(path).is_file():
        return src
    card = read_card(path)
    src.update(card=str(card_path(path).absolute()), step=card.get("step"))
    seed = ((card.get("config") or {}).get("train") or {}).get("seed")
    if seed is not None:
        src["seed"] = int(seed)
    for k in ("source", "command", "data"):
        if k in card:
            src[f"card_{k}"] = card[k]
    return src


def load_params_file(path: str | os.PathLike, cfg: ExperimentConfig, part: str,
                     what: str | None = None, *, card_required: bool = True
                     ) -> tuple[Any, dict]:
    """(params, provenance) of `part` ("gist" | "lens") from a params-only file, checked
    against `cfg`'s architecture of that part (`check_params`; `what` names the file in
    the error; `card_required` as in `params_file_source`). `cfg.base_config` must be
    set."""
    import jax
    import jax.numpy as jnp

    params = jax.tree.map(jnp.asarray, load_params_safetensors(path))  # AssetError if absent
    source = params_file_source(path, card_required)
    check_params(params, cfg, part, what or f"{part} params in {path}")
    return params, source


def save_gist_params(params: Any, cfg: ExperimentConfig, path: str | os.PathLike,
                     **card: Any) -> tuple[Path, Path]:
    """Write GistNet params and their card (config = `cfg`, plus the `card` entries)."""
    out = save_params_safetensors(params, path, {"part": "gist"})
    return out, write_card(out, {"format": FORMAT, "part": "gist",
                                 "config": config_to_json(cfg), **card})


def export_gist_params(workdir: str | os.PathLike, path: str | os.PathLike, *,
                       step: int | None = None, dtype: str | None = None, ema: bool = False,
                       **card_entries: Any) -> tuple[Path, Path]:
    """A training workdir's GistNet (latest or `step`; `ema`: its params' moving average)
    as a params-only file + card (the checkpoint's config; source, step, run and which
    weights in the card)."""
    from mcjax.checkpoint import restore_trained_params

    workdir = Path(workdir)
    trained, meta, step = restore_trained_params(workdir, step, ema=ema)
    gist = trained.get("gist")
    if gist is None:
        raise CheckpointError(f"checkpoint {workdir} (step {step}) holds no gist params")
    out = save_params_safetensors(gist, path, {"part": "gist"}, dtype=dtype)
    card = {"format": FORMAT, "part": "gist", "config": meta.get("config") or {},
            "source": {"workdir": str(workdir.absolute()), "step": int(step),
                       "run": (meta.get("extra") or {}).get("run") or "train_gist"},
            "step": int(step), "stored_dtype": dtype or "as trained",
            "weights": (f"ema (decay {(meta.get('extra') or {}).get('ema_decay')})" if ema
                        else "params"), **card_entries}
    return out, write_card(out, card)


# --------------------------------------------------------------------------- shipped nets

# The GistNet that ships with the package (SPEC §2.10), trained for the named config's
# base model and GistNet architecture; see its card for the command, data and figures.
SHIPPED_GIST = ASSET_DIR / "gistnet_smollm2_135m.safetensors"


def _mc_fits(config: dict, cfg: ExperimentConfig) -> bool:
    """The card's base model and block structure are `cfg`'s (what gists depend on)."""
    return config.get("base") == cfg.base and all(
        config["mc"].get(k) == getattr(cfg.mc, k)
        for k in ("block_size", "num_levels", "position_scheme", "sink_blocks"))


def _load_shipped(path: Path, cfg: ExperimentConfig, part: str,
                  fits: Callable[[dict], bool]) -> tuple[Any, dict] | None:
    """Params + provenance of the shipped `part` at `path` when its card `fits`, else
    None (also when the file or its card is absent)."""
    import jax
    import jax.numpy as jnp

    if not path.is_file() or not card_path(path).is_file():
        return None
    card = read_card(path)
    if not fits(card):
        return None
    params = jax.tree.map(jnp.asarray, load_params_safetensors(path))
    check_params(params, cfg, part, f"shipped {part} params in {path}")
    return params, {"source": "shipped", "path": str(path), "card": str(card_path(path)),
                    "step": card.get("step")}


def shipped_gist(cfg: ExperimentConfig, path: str | os.PathLike | None = None
                 ) -> tuple[Any, dict] | None:
    """The shipped GistNet params and their provenance when they fit `cfg` (same base
    model, GistNet architecture, block size, levels, position scheme and sink — the gists
    were trained under those), else None: a session of another
    setup then starts untrained, as before. `cfg.base_config` must be set."""
    return _load_shipped(Path(SHIPPED_GIST if path is None else path), cfg, "gist",
                         lambda card: _mc_fits(card["config"], cfg)
                         and gist_config_from_card(card) == cfg.gist)


# --------------------------------------------------------------------------- LensNet

SHIPPED_LENS = ASSET_DIR / "lensnet_smollm2_135m.safetensors"


def lens_config_from_card(card: dict) -> LensConfig:
    return _section_config(card, "lens", LensConfig)


def check_lens_params(params: Any, cfg: ExperimentConfig, what: str = "lens params") -> None:
    """Same param names and shapes as `init_lens` for `cfg` (base_config set)."""
    check_params(params, cfg, "lens", what)


# the retrieval settings that shape LensNet v2's inputs. `follow` and `relevant_share`
# (newer than the shipped card, trained at 0 and off) are left out on purpose: they only
# add blocks to the relevant set (the block after each top block; more top blocks in a
# larger WC), which LensNet's features then show as relevant too.
_RETRIEVAL_FIELDS = ("layers", "chunk", "queries", "query_window", "top_blocks", "spread")


def shipped_lens(cfg: ExperimentConfig, path: str | os.PathLike | None = None
                 ) -> tuple[Any, dict] | None:
    """The shipped LensNet params and their provenance when they fit `cfg` — same base
    model, LensNet config, block size, levels, position scheme, sink, retrieval config
    and GistNet (it was trained on the shipped GistNet's gists and the retrieval
    relevance of that config) — else None. `cfg.base_config` must be set."""
    def fits(card):
        config, ours = card["config"], config_to_json(cfg)
        retrieval = {**(config.get("retrieval") or {}),
                     **(((card.get("serving") or {}).get("config") or {}).get("retrieval")
                        or {})}
        return (_mc_fits(config, cfg) and lens_config_from_card(card) == cfg.lens
                and gist_config_from_card(card) == cfg.gist
                and (not cfg.lens.retrieval_features
                     or all(retrieval.get(k) == ours["retrieval"][k]
                            for k in _RETRIEVAL_FIELDS)))

    return _load_shipped(Path(SHIPPED_LENS if path is None else path), cfg, "lens", fits)
