"""Which GistNet / LensNet params run, and where they came from — the one place that
resolves nets.

A net (`part` "gist" or "lens") comes from one of four sources, each giving
`(params, provenance)`:

- shipped: `shipped_gist(cfg)` / `shipped_lens(cfg)`, the package's params
  (`mcjax.assets.SHIPPED_GIST` / `SHIPPED_LENS`) when their card fits `cfg`, else None;
- a params file: `load_params_file(path, cfg, part)` (`mcjax.assets` format: the card's
  sha256 is checked before anything is read) — every `--*-params FILE` option;
- a training workdir: `load_trained_params(workdir, cfg, part)` (an orbax checkpoint,
  `mcjax.checkpoint`); `lens_gistnet` finds the GistNet a LensNet was trained with;
- untrained: `untrained_params(cfg, part, base_params)`, the init the trainers start from
  (`init_params`).

Every loaded tree is checked against `cfg`'s architecture of the part (`check_params`),
and a stored config that differs from `cfg` (base model, block structure, the part's
architecture) is a `CheckpointMismatchError` naming the fields: nothing is guessed or
adapted. Errors are `mcjax.errors.CheckpointError`s (an `AssetError` for a params file).

Provenance is a dict: "source" ("shipped" | "params_file" | "checkpoint" | "untrained" |
"given") with "path", "card", "step", "seed" and the like. `source_identity` is what a
training run records of the net it starts from or trains on (cheap: no params are read;
what a resume must agree on and what `lens_gistnet` later follows).

The policies over the sources: `default_params` (a `Session`'s: shipped when it fits, else
untrained), `from_workdirs` (GistNet / LensNet workdirs, a LensNet's own GistNet when no
GistNet is named) and `resolve_networks` (an evaluation's, with the untrained GistNet as
the ΔNLL baseline).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcjax import assets
from mcjax.checkpoint import Checkpointer, restore_trained_params
from mcjax.config import ConfigError, ExperimentConfig, base_architecture, config_to_json
from mcjax.errors import CheckpointError, CheckpointMismatchError
from mcjax.gist import embedding_rms, init_gist_params
from mcjax.lens import init_lens

__all__ = ["PARTS", "expected_params", "check_params", "init_params", "untrained_params",
           "shipped_gist", "shipped_lens", "params_file_source", "load_params_file",
           "load_trained_params", "checkpoint_parts", "source_identity", "load_identified",
           "lens_gistnet",
           "LENS_GISTNET", "export_gist_params", "default_params", "from_workdirs",
           "Networks", "resolve_networks"]

PARTS = ("gist", "lens")
_NAMES = {"gist": "GistNet", "lens": "LensNet"}


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be 'gist' or 'lens', got {part!r}")


# --------------------------------------------------------------------------- architecture


def expected_params(cfg: ExperimentConfig, part: str):
    """The abstract param tree (shapes) of `part` ("gist" | "lens") for `cfg`
    (base_config set): what the trainers' init makes."""
    _check_part(part)
    return jax.eval_shape(lambda k: _init(cfg, part, 1.0, k), jax.random.key(0))


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def check_params(params: Any, cfg: ExperimentConfig, part: str, what: str | None = None,
                 exc: type[Exception] = CheckpointMismatchError) -> None:
    """`params` have the param names and shapes of `part` for `cfg` (`expected_params`),
    else `exc` naming what is missing, unexpected or of the wrong shape."""
    name = _NAMES.get(part, part)
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


def _config_differences(saved: dict, cfg: ExperimentConfig, part: str) -> list[str]:
    """Fields that must agree for `part` params of a checkpoint to mean the same thing
    here: the base model, the block structure and the part's own architecture."""
    mine = config_to_json(cfg)
    pairs = {
        "base": (saved.get("base"), mine.get("base")),
        "base_config": (base_architecture(saved.get("base_config")),
                        base_architecture(mine.get("base_config"))),
        "mc.block_size": ((saved.get("mc") or {}).get("block_size"), cfg.mc.block_size),
        "mc.num_levels": ((saved.get("mc") or {}).get("num_levels"), cfg.mc.num_levels),
        part: (saved.get(part), mine.get(part)),
    }
    out = []
    for name, (theirs, ours) in pairs.items():
        if theirs == ours:
            continue
        if isinstance(theirs, dict) and isinstance(ours, dict):
            for k in sorted(set(theirs) | set(ours)):
                if theirs.get(k) != ours.get(k):
                    out.append(f"{name}.{k}: checkpoint {theirs.get(k)!r} vs session "
                               f"{ours.get(k)!r}")
        else:
            out.append(f"{name}: checkpoint {theirs!r} vs session {ours!r}")
    return out


# --------------------------------------------------------------------------- untrained


def _init(cfg: ExperimentConfig, part: str, output_rms: float, key):
    D = cfg.base_config.hidden_size
    if part == "gist":
        return init_gist_params(cfg.gist, D, key, block_size=cfg.mc.block_size,
                                output_rms=output_rms)
    return init_lens(cfg.lens, cfg.mc, D, jax.random.fold_in(key, 1))


def _output_rms(part: str, base_params) -> float:
    # Gists start at the embeddings' scale: at output_rms=1 they are ~O(10x) too large for
    # SmolLM2 and the frozen model reads them as noise before training has moved anything.
    return 1.0 if part != "gist" or base_params is None else embedding_rms(base_params)


@functools.partial(jax.jit, static_argnames=("cfg", "part", "output_rms"))
def _init_jit(cfg: ExperimentConfig, part: str, output_rms: float, seed):
    return _init(cfg, part, output_rms, jax.random.key(seed))


def init_params(cfg: ExperimentConfig, part: str, base_params=None, *,
                seed: int | None = None):
    """Fresh params of the untrained GistNet / LensNet the trainers start from (the seed
    is `cfg.train.seed` unless `seed` names another run's; pass the base params so an
    untrained GistNet's gists have the embeddings' scale). New arrays every call: a
    trainer may donate them."""
    _check_part(part)
    if cfg.base_config is None:
        raise ConfigError("untrained params need cfg.base_config (the base architecture)")
    return _init_jit(cfg, part, _output_rms(part, base_params),
                     cfg.train.seed if seed is None else int(seed))


@functools.lru_cache(maxsize=8)
def _untrained(cfg: ExperimentConfig, part: str, output_rms: float, seed: int):
    return _init_jit(cfg, part, output_rms, seed)


def untrained_params(cfg: ExperimentConfig, part: str, base_params=None, *,
                     seed: int | None = None):
    """The untrained GistNet / LensNet the trainers start from (`init_params`, the same
    arrays for the same arguments: sessions and evaluations share them, never donate)."""
    _check_part(part)
    if cfg.base_config is None:
        raise ConfigError("untrained_params needs cfg.base_config")
    return _untrained(cfg, part, _output_rms(part, base_params),
                      cfg.train.seed if seed is None else int(seed))


# --------------------------------------------------------------------------- shipped


def _mc_fits(config: dict, cfg: ExperimentConfig) -> bool:
    """The card's base model and block structure are `cfg`'s (what gists depend on)."""
    return config.get("base") == cfg.base and all(
        config["mc"].get(k) == getattr(cfg.mc, k)
        for k in ("block_size", "num_levels", "position_scheme", "sink_blocks"))


def _load_shipped(path: Path, cfg: ExperimentConfig, part: str,
                  fits: Callable[[dict], bool]) -> tuple[Any, dict] | None:
    """Params + provenance of the shipped `part` at `path` when its card `fits`, else
    None (also when the file or its card is absent)."""
    if not path.is_file() or not assets.card_path(path).is_file():
        return None
    card = assets.read_card(path)
    if not fits(card):
        return None
    params = jax.tree.map(jnp.asarray, assets.load_params_safetensors(path))
    check_params(params, cfg, part, f"shipped {part} params in {path}")
    return params, {"source": "shipped", "path": str(path),
                    "card": str(assets.card_path(path)), "step": card.get("step")}


def shipped_gist(cfg: ExperimentConfig, path: str | os.PathLike | None = None
                 ) -> tuple[Any, dict] | None:
    """The shipped GistNet params and their provenance when they fit `cfg` (same base
    model, GistNet architecture, block size, levels, position scheme and sink — the gists
    were trained under those), else None: a session of another setup then starts
    untrained. `cfg.base_config` must be set."""
    return _load_shipped(Path(assets.SHIPPED_GIST if path is None else path), cfg, "gist",
                         lambda card: _mc_fits(card["config"], cfg)
                         and assets.gist_config_from_card(card) == cfg.gist)


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
        return (_mc_fits(config, cfg) and assets.lens_config_from_card(card) == cfg.lens
                and assets.gist_config_from_card(card) == cfg.gist
                and (not cfg.lens.retrieval_features
                     or all(retrieval.get(k) == ours["retrieval"][k]
                            for k in _RETRIEVAL_FIELDS)))

    return _load_shipped(Path(assets.SHIPPED_LENS if path is None else path), cfg, "lens",
                         fits)


# --------------------------------------------------------------------------- params files


def params_file_source(path: str | os.PathLike, card_required: bool = True) -> dict:
    """Provenance of a params-only file: its path and card, the step and training seed
    the card records, and the card's own source, command and data. A missing card is an
    AssetError unless `card_required=False` (a bare warm start: `"card": None`, no step)."""
    src = {"source": "params_file", "path": str(Path(path).absolute()), "card": None,
           "step": None}
    if not card_required and not assets.card_path(path).is_file():
        return src
    card = assets.read_card(path)
    src.update(card=str(assets.card_path(path).absolute()), step=card.get("step"))
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
    _check_part(part)
    params = jax.tree.map(jnp.asarray, assets.load_params_safetensors(path))  # AssetError if absent
    source = params_file_source(path, card_required)
    check_params(params, cfg, part, what or f"{part} params in {path}")
    return params, source


def _load_gist_file(path, cfg: ExperimentConfig) -> tuple[Any, dict]:
    """(params, provenance) of an explicit params-only GistNet file; the config must
    already carry its card's GistNet (an evaluation applies the card first)."""
    if assets.gist_config_from_card(assets.read_card(path)) != cfg.gist:
        raise ValueError(f"the config's GistNet differs from the card of {path}: apply the "
                         f"card first (mcjax.assets.apply_card)")
    return load_params_file(path, cfg, "gist", f"GistNet params in {path}")


# --------------------------------------------------------------------------- workdirs

_RUN_PARTS = {"train_gist": ("gist",), "train_lens": ("lens",), "train_joint": ("gist", "lens")}


def checkpoint_parts(workdir: str | os.PathLike) -> tuple[str, tuple[str, ...]]:
    """(run kind, nets it holds) of a training workdir's latest checkpoint (cheap: its
    meta only)."""
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


def load_trained_params(workdir: str | os.PathLike, cfg: ExperimentConfig, part: str, *,
                        step: int | None = None, ema: bool = False) -> tuple[Any, dict]:
    """GistNet (`part="gist"`) or LensNet (`part="lens"`) params from a training workdir
    (`train_gist`, `train_lens` or `train_joint`), and where they came from.

    `cfg.base_config` must be set (the base model's architecture). Raises CheckpointError
    for a missing directory, no complete checkpoint, or a checkpoint without that part;
    CheckpointMismatchError when it was trained for another base model, block structure or
    architecture of the part. `ema`: the params' moving average
    (`mcjax.checkpoint.restore_trained_params`).
    """
    _check_part(part)
    if cfg.base_config is None:
        raise ConfigError("load_trained_params needs cfg.base_config (the base architecture)")
    path = Path(workdir)

    def check(meta: dict, step: int) -> None:
        diffs = _config_differences(meta.get("config") or {}, cfg, part)
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {path} (step {step}) was trained for a different setup than this "
                f"session's {part} network:\n  " + "\n  ".join(diffs))

    trained, meta, step = restore_trained_params(path, step, check=check, ema=ema)
    if part not in trained:
        raise CheckpointError(f"checkpoint {path} (step {step}) holds no {part} params (it "
                              f"has {sorted(trained)})")
    params = jax.tree.map(jnp.asarray, trained[part])
    check_params(params, cfg, part, f"{part} params in {path}")
    extra = meta.get("extra") or {}
    source = {"source": "checkpoint", "path": str(path.absolute()), "step": int(step),
              "run": extra.get("run"), "gistnet": extra.get("gistnet")}
    seed = ((meta.get("config") or {}).get("train") or {}).get("seed")
    if seed is not None:  # the training seed: its init is the untrained baseline
        source["seed"] = int(seed)
    if ema:
        source["weights"] = f"ema (decay {extra.get('ema_decay')})"
    return params, source


def source_identity(cfg: ExperimentConfig, *, workdir: str | os.PathLike | None = None,
                    params_file: str | os.PathLike | None = None) -> dict:
    """What a training run records of a net it starts from or trains on, without reading
    params: a workdir's latest checkpoint {"source": "checkpoint", "path", "step"}, a
    params file {"source": "params_file", "path", "step"} (its card's), or neither: the
    untrained net of the config's seed {"source": "untrained", "seed"}. A resume must
    agree on it; `lens_gistnet` follows it; `load_identified` loads it."""
    if workdir is not None and params_file is not None:
        raise ValueError("give a GistNet workdir or a GistNet params file, not both")
    if params_file is not None:
        src = params_file_source(params_file)
        return {k: src[k] for k in ("source", "path", "step")}
    if workdir is None:
        return {"source": "untrained", "seed": cfg.train.seed}
    ckpt = Checkpointer(workdir, create=False)
    try:
        step = ckpt.latest_step()
    finally:
        ckpt.close()
    if step is None:
        raise CheckpointError(f"no complete checkpoint under {workdir}")
    return {"source": "checkpoint", "path": str(Path(workdir).absolute()), "step": int(step)}


def load_identified(identity: dict, cfg: ExperimentConfig, part: str, base_params=None, *,
                    what: str | None = None) -> Any:
    """The params of `part` that `source_identity` named (a checkpoint at its recorded
    step, a params file, or the untrained net of its seed), checked against `cfg`."""
    source = identity["source"]
    if source == "checkpoint":
        return load_trained_params(identity["path"], cfg, part, step=identity["step"])[0]
    if source == "params_file":
        return load_params_file(identity["path"], cfg, part, what)[0]
    if source == "untrained":
        return init_params(cfg, part, base_params, seed=identity["seed"])
    raise ValueError(f"no {part} params can be loaded from {identity}")


LENS_GISTNET = "the LensNet checkpoint's GistNet"


def lens_gistnet(lens_source: dict, cfg: ExperimentConfig, base_params=None
                 ) -> tuple[Any, dict] | None:
    """The GistNet a LensNet was trained with, so that it sees the gists it learned on:
    `lens_source` is the LensNet's provenance (`load_trained_params`). A `train_joint`
    run's own GistNet; else the GistNet checkpoint or params file a `train_lens` run
    names (`source_identity`), while it still exists; else the untrained GistNet of the
    seed it names (pass the base params: its init scale). Returns (params, provenance with
    `chosen_by`), or None when the LensNet names no GistNet that can be found."""
    origin = lens_source.get("gistnet") or {}
    path = Path(origin.get("path") or "")
    if lens_source.get("run") == "train_joint":
        params, src = load_trained_params(lens_source["path"], cfg, "gist")
    elif origin.get("source") == "checkpoint" and path.is_dir():
        params, src = load_trained_params(path, cfg, "gist")
    elif origin.get("source") == "params_file" and path.is_file():
        params, src = load_params_file(path, cfg, "gist", f"{LENS_GISTNET} {path}")
    elif origin.get("source") == "untrained" and "seed" in origin:
        seed = int(origin["seed"])
        params, src = (untrained_params(cfg, "gist", base_params, seed=seed),
                       {"source": "untrained", "seed": seed})
    else:
        return None
    return params, dict(src, chosen_by=LENS_GISTNET)


def export_gist_params(workdir: str | os.PathLike, path: str | os.PathLike, *,
                       step: int | None = None, dtype: str | None = None, ema: bool = False,
                       **card_entries: Any) -> tuple[Path, Path]:
    """A training workdir's GistNet (latest or `step`; `ema`: its params' moving average)
    as a params-only file + card (the checkpoint's config; source, step, run and which
    weights in the card)."""
    workdir = Path(workdir)
    trained, meta, step = restore_trained_params(workdir, step, ema=ema)
    gist = trained.get("gist")
    if gist is None:
        raise CheckpointError(f"checkpoint {workdir} (step {step}) holds no gist params")
    out = assets.save_params_safetensors(gist, path, {"part": "gist"}, dtype=dtype)
    extra = meta.get("extra") or {}
    card = {"format": assets.FORMAT, "part": "gist", "config": meta.get("config") or {},
            "source": {"workdir": str(workdir.absolute()), "step": int(step),
                       "run": extra.get("run") or "train_gist"},
            "step": int(step), "stored_dtype": dtype or "as trained",
            "weights": f"ema (decay {extra.get('ema_decay')})" if ema else "params",
            **card_entries}
    return out, assets.write_card(out, card)


# --------------------------------------------------------------------------- policies


def default_params(cfg: ExperimentConfig, gist_params, lens_params, base_params, *,
                   untrained: bool = False, focus_policy: str = "lens"):
    """The nets a session uses when they are not given: the shipped GistNet (and, for
    focus "lens", the shipped LensNet) when they fit `cfg`, else — and with
    `untrained=True` always — the untrained ones the trainers start from. Returns
    (gist_params, lens_params, provenance of the parts resolved here)."""
    provenance = {}
    if gist_params is None and not untrained:
        shipped = shipped_gist(cfg)
        if shipped is not None:
            gist_params, provenance["gist"] = shipped
    if gist_params is None:
        gist_params = untrained_params(cfg, "gist", base_params)
        provenance["gist"] = {"source": "untrained", "seed": cfg.train.seed}
    if lens_params is None and not untrained and focus_policy == "lens":
        shipped = shipped_lens(cfg)
        if shipped is not None:
            lens_params, provenance["lens"] = shipped
    if lens_params is None:
        lens_params = untrained_params(cfg, "lens")
        provenance["lens"] = {"source": "untrained", "seed": cfg.train.seed}
    return gist_params, lens_params, provenance


def from_workdirs(cfg: ExperimentConfig, base_params=None, *,
                  gist_workdir: str | os.PathLike | None = None,
                  lens_workdir: str | os.PathLike | None = None
                  ) -> dict[str, tuple[Any, dict]]:
    """{part: (params, provenance)} of the nets training workdirs give: the LensNet of
    `lens_workdir`, the GistNet of `gist_workdir` — or, without one, the GistNet the
    LensNet was trained with when it can be found (`lens_gistnet`), so that LensNet sees
    the gists it learned on. Parts neither gives are absent."""
    out: dict[str, tuple[Any, dict]] = {}
    if lens_workdir is not None:
        out["lens"] = load_trained_params(lens_workdir, cfg, "lens")
    if gist_workdir is not None:
        out["gist"] = load_trained_params(gist_workdir, cfg, "gist")
    elif "lens" in out:
        found = lens_gistnet(out["lens"][1], cfg, base_params)
        if found is not None:
            out["gist"] = found
    return out


@dataclasses.dataclass
class Networks:
    """The nets an evaluation runs with (`resolve_networks`)."""

    gist: Any  # GistNet params the MegaContext methods use
    lens: Any  # LensNet params
    untrained_gist: Any  # the GistNet training starts from (ΔNLL baseline)
    sources: dict[str, dict]  # "gist" / "lens" / "untrained_gist" -> provenance

    @property
    def untrained(self) -> tuple[str, ...]:
        """Nets the methods use untrained ("gist", "lens")."""
        return tuple(p for p in PARTS if self.sources[p]["source"] == "untrained")


def resolve_networks(cfg: ExperimentConfig, base_params, *, checkpoint=None,
                     gist_checkpoint=None, lens_checkpoint=None, gist_params=None,
                     untrained: bool = False) -> Networks:
    """An evaluation's GistNet and LensNet params (and the untrained GistNet baseline)
    with provenance.

    A training workdir tells by its checkpoint metadata which nets it holds (`checkpoint`:
    `train_gist` → GistNet, LensNet untrained; `train_lens` → LensNet and the GistNet it
    was trained on when that can be found; `train_joint` → both). Explicit
    `gist_checkpoint` / `lens_checkpoint` take precedence; `gist_params` is a params-only
    GistNet file whose card the config must already carry (`mcjax.assets.apply_card`);
    with nothing given the shipped GistNet (an error when none fits) and the shipped
    LensNet when one fits; `untrained=True` evaluates the untrained nets on purpose.

    `cfg.base_config` must be set. Raises CheckpointError / CheckpointMismatchError (see
    the module docstring) and ValueError for contradictory or missing choices.
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
    if gist_params is None:
        trained = from_workdirs(cfg, base_params, gist_workdir=gist_dir, lens_workdir=lens_dir)
    else:  # the file's GistNet, whichever GistNet the LensNet was trained with
        trained = {} if lens_dir is None else {
            "lens": load_trained_params(lens_dir, cfg, "lens")}
    shipped_l = shipped_lens(cfg) if shipped is not None else None  # nothing given
    if "lens" in trained:
        lens, sources["lens"] = trained["lens"]
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
    elif "gist" in trained:
        gist, sources["gist"] = trained["gist"]
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
