"""Load a frozen base model from a local Hugging Face directory (never the network).

`load_base_model("smollm2-135m")` resolves the shipped SmolLM2 (converting it once into the
cache); any other local Llama-family HF directory (`config.json`, `*.safetensors`,
`tokenizer.json`) loads too.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.base import convert
from mcjax.base.hf_layout import hf_to_params_layout
from mcjax.base.model import Params, init_params
from mcjax.config import ConfigError, LlamaConfig

_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or corrupt."""


@dataclasses.dataclass(frozen=True, eq=False)
class BaseModel:
    """A loaded frozen base model: architecture, parameters, tokenizer, source directory."""

    config: LlamaConfig
    params: Params
    tokenizer: Any
    path: Path

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`; raises rather than silently drop bytes the vocab lacks."""
        bad = set(text.encode("utf-8", "surrogatepass")) & self.unencodable_bytes
        if bad:
            chars = sorted({c for c in text if set(c.encode("utf-8", "surrogatepass")) & bad})
            raise ValueError(f"text contains characters this tokenizer cannot represent "
                             f"(its vocabulary lacks their bytes): {chars[:10]}")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

    @functools.cached_property
    def unencodable_bytes(self) -> frozenset[int]:
        """Bytes with no byte-level token (SmolLM2 lacks e.g. the ASCII controls 0x04, 0x1D)."""
        from tokenizers.pre_tokenizers import ByteLevel

        vocab = self.tokenizer.get_vocab()
        # ByteLevel.alphabet() is unordered; rebuild GPT-2's byte → symbol table.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                     *range(ord("®"), ord("ÿ") + 1)]
        symbol, extra = {}, 0
        for b in range(256):
            if b in printable:
                symbol[b] = chr(b)
            else:
                symbol[b] = chr(256 + extra)
                extra += 1
        assert set(symbol.values()) == set(ByteLevel.alphabet())
        return frozenset(b for b, c in symbol.items() if c not in vocab)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)


def resolve_model_dir(name_or_path: str | os.PathLike, *, convert_if_missing: bool = True,
                      progress: bool = True) -> Path:
    """A shipped-model name → its converted cache dir; otherwise an existing local dir."""
    name = os.fspath(name_or_path)
    if convert.canonical_name(name) is not None and not os.path.isdir(name):
        if convert_if_missing:
            return convert.ensure_shipped_model(name, progress=progress)
        path = convert.shipped_model_dir(name)
        if not (path / convert.MANIFEST).is_file():
            raise ModelLoadError(f"{name} has not been converted yet; run `{convert.setup_command(name)}`")
        return path
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model {name!r} is neither a shipped model ({', '.join(convert.SHIPPED_MODELS)}) "
            f"nor an existing directory")
    return path


def load_config(model_dir: str | os.PathLike) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model dir")
    try:
        return LlamaConfig.from_json_file(path)
    except ConfigError as e:
        raise ModelLoadError(f"bad config in {path}: {e}") from e


def load_params(model_dir: str | os.PathLike, config: LlamaConfig) -> Params:
    """Read every weight from `*.safetensors` into our (layer-stacked) param tree."""
    from safetensors import SafetensorError, safe_open

    files = weight_files(model_dir)
    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    dtype = np.dtype(jnp.dtype(config.dtype))
    buffers: dict[tuple[str, ...], np.ndarray] = {
        path: np.empty(leaf.shape, dtype) for path, leaf in _flatten(expected).items()}
    layout = hf_to_params_layout(config)
    seen: set[str] = set()
    for file in files:
        try:
            handle = safe_open(file, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"corrupt safetensors file {file}: {e}") from e
        with handle as f:
            for name in f.keys():
                if name in seen:
                    raise ModelLoadError(f"{file}: tensor {name!r} appears in more than one "
                                         f"weight file of {model_dir}")
                if name not in layout:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied: the head is the embedding
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ModelLoadError(f"{file}: unexpected tensor {name!r} for this config")
                st_dtype = f.get_slice(name).get_dtype()
                if st_dtype not in _FLOAT_DTYPES:
                    raise ModelLoadError(f"{file}: tensor {name!r} has dtype {st_dtype}; "
                                         f"weights must be floating point "
                                         f"({', '.join(_FLOAT_DTYPES)})")
                try:
                    arr = (_read_bf16(f, name) if st_dtype == "BF16" else f.get_tensor(name))
                except (SafetensorError, OSError, ValueError) as e:
                    raise ModelLoadError(f"corrupt tensor {name!r} in {file}: {e}") from e
                path, layer, transpose = layout[name]
                if transpose:
                    arr = arr.T
                target = buffers[path] if layer is None else buffers[path][layer]
                if arr.shape != target.shape:
                    raise ModelLoadError(f"{file}: tensor {name!r} has shape {arr.shape}, "
                                         f"expected {target.shape} for this config")
                target[...] = arr
                seen.add(name)
    missing = sorted(set(layout) - seen)
    if missing:
        raise ModelLoadError(f"{model_dir} is missing {len(missing)} weights, e.g. {missing[:3]}")
    return _unflatten({path: jnp.asarray(buf) for path, buf in buffers.items()})


SHARD_INDEX = "model.safetensors.index.json"


def weight_files(model_dir: str | os.PathLike) -> list[str]:
    """The safetensors files holding a directory's weights: the shards its
    `model.safetensors.index.json` names (each must exist), else every `*.safetensors`
    file. `load_params` then refuses a tensor found in two files and reports every
    expected tensor no file holds."""
    index = Path(model_dir) / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a safetensors shard index "
                                 f"(a JSON object with a 'weight_map'): {e}") from e
        missing = [f for f in shards if not (Path(model_dir) / f).is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not in {model_dir}: "
                                 f"{missing[:3]}")
        return [os.path.join(model_dir, f) for f in shards]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weight files")
    return files


def _read_bf16(f, name: str) -> np.ndarray:
    # numpy has no bfloat16: read the raw bits and reinterpret with ml_dtypes' bfloat16.
    sl = f.get_slice(name)
    raw = sl[:]
    return np.asarray(raw).view(jnp.bfloat16) if raw.dtype != jnp.bfloat16 else raw


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def load_tokenizer(model_dir: str | os.PathLike):
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {e}") from e


def load_base_model(name_or_path: str | os.PathLike, *, dtype: str | None = None,
                    with_tokenizer: bool = True, progress: bool = True) -> BaseModel:
    """Load config, params (and tokenizer) of a shipped name or a local HF directory."""
    path = resolve_model_dir(name_or_path, progress=progress)
    config = load_config(path)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    params = load_params(path, config)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return BaseModel(config=config, params=params, tokenizer=tokenizer, path=path)
