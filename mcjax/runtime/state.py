"""The runtime's state and plan (SPEC §2.7): what the pure programs carry and are keyed by.

`StreamState` (device) and the batched `TreeView` (device) are everything the jitted
`refocus` / `decode_block` programs read and write; the trees (host, `mcjax.tree`) are the
durable history the view is uploaded from. `Plan` is the static, hashable description that
keys the programs' compilation (gemma-sampler style). The host builders here
(`initial_state`, `empty_view`, `initial_layouts`), with `mcjax.tree.view_update` for the
trees' new rows, are what a caller needs to drive the programs from a plain loop; `Session`
is one such caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mcjax import working_context as wcm
from mcjax.base.model import KVCache
from mcjax.checks import as_int
from mcjax.config import ConfigError, ExperimentConfig, LlamaConfig
from mcjax.tree import TreeView

__all__ = ["StreamState", "Plan", "DEFAULT_MAX_TOKENS", "FOCUS_POLICIES", "KV_REUSE",
           "DECODE_FOCUS",
           "make_plan", "initial_state", "empty_view", "initial_layouts",
           "pending_base_position"]

DEFAULT_MAX_TOKENS = 1 << 17  # per-stream history capacity of the device view (131,072)
# Where refocus scores come from: LensNet (the design), or a baseline policy that replaces
# its scores inside the same session machinery (see `recency_scores`, `random_scores`).
FOCUS_POLICIES = ("lens", "random", "recency", "retrieval")
# How a refocus rebuilds the cache after edits: "exact" re-prefills every slot from the first
# change on; "approx" keeps the entries of unchanged slots (moved and re-rotated) and
# recomputes only the chunks with new entries and the newest one (CacheBlend-style).
KV_REUSE = ("exact", "approx")
# When the allocator acts in a refocus after K decoded tokens: "every" such refocus (the K
# cadence of SPEC §2.6), or "on_collapse": only in those that must make room anyway (a budget
# or headroom collapse re-prefills from near the front), so the refocuses between them only
# append and re-prefill nothing. Refocuses after input (and their settle rounds) always act.
DECODE_FOCUS = ("every", "on_collapse")


@flax.struct.dataclass
class StreamState:
    """Everything the jitted programs carry between calls; leading axis B = streams."""

    wc: wcm.WorkingContext  # [B, W] working contexts (what cache slots [0, W) hold)
    cache: KVCache  # k/v [layers, B, W + K, kv_heads, head_dim]; valid [B, W + K]
    next_token: jax.Array  # [B] int32 greedy prediction after the newest history token
    pending: jax.Array  # [B, K] int32 tokens decoded since the last refocus (pad if done)
    num_pending: jax.Array  # [] int32 pending slots used (shared by all streams)
    done: jax.Array  # [B] bool stream emitted EOS in the current generation


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static, hashable description of a session's programs (the jit cache key); built by
    `make_plan`, which checks every setting and fills the defaults."""

    llama: LlamaConfig
    mc: Any  # MCConfig
    lens: Any  # LensConfig
    batch_size: int
    max_tokens: int
    pad_id: int
    headroom: int  # slots to free ahead when the next block would not fit (0: off)
    prefill_chunk: int  # C: slots per bulk re-prefill chunk (a multiple of K dividing w_max)
    focus_policy: str = "lens"  # one of FOCUS_POLICIES
    retrieval: Any = None  # RetrievalConfig (focus_policy "retrieval", or LensNet v2)
    kv_reuse: str = "exact"  # one of KV_REUSE (see `_kv_sources`, `_moved_kv`)
    decode_focus: str = "every"  # one of DECODE_FOCUS

    @property
    def keeps_keys(self) -> bool:
        """The trees keep read-pass keys: retrieval focus, or LensNet v2's relevance."""
        return self.focus_policy == "retrieval" or (self.focus_policy == "lens"
                                                    and self.lens.retrieval_features)

    @property
    def query_aware(self) -> bool:
        """Scores depend on the newest tokens' read (so focus can settle after input)."""
        return self.focus_policy == "retrieval" or (self.focus_policy == "lens"
                                                    and self.lens.conditioned)

    @property
    def settle_rounds(self) -> int:
        """Extra allocator rounds after input while focus still moves (query-aware plans)."""
        return self.retrieval.settle_rounds if self.query_aware and self.retrieval else 0

    @property
    def num_slots(self) -> int:
        return self.mc.w_max + self.mc.block_size

    def view_rows(self, level: int) -> int:
        return max(1, -(-self.max_tokens // self.mc.block_size**level))


def make_plan(llama: LlamaConfig, cfg: ExperimentConfig, *, batch_size: int = 1,
              max_tokens: int = DEFAULT_MAX_TOKENS, collapse_headroom: int | None = None,
              prefill_chunk: int | None = None, pad_id: int = 0, focus_policy: str = "lens",
              kv_reuse: str = "exact", decode_focus: str = "every") -> Plan:
    """The `Plan` of a session over base model `llama` with experiment config `cfg`: the one
    constructor that checks every setting of the programs before any work (TypeError for
    a wrong kind of argument, else ConfigError naming the setting) and fills the defaults.
    What `Session` compiles its programs for, and what a caller driving the programs itself
    (or projecting their cost by AOT compilation, `mcjax.projection`) should build.
    Defaults are `Session`'s: headroom an eighth of w_max in whole blocks, prefill chunk
    the largest K·2^i <= 256 dividing w_max.
    """
    if not isinstance(llama, LlamaConfig):
        raise TypeError(f"base config must be a LlamaConfig, got {type(llama).__name__}")
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"cfg must be an ExperimentConfig, got {type(cfg).__name__}")
    # the dtype may differ (a base model served in another precision)
    if cfg.base_config is not None and \
            dataclasses.replace(cfg.base_config, dtype=llama.dtype) != llama:
        raise ConfigError(f"config {cfg.name!r} describes a different base model "
                          f"({cfg.base_config}) than the one given ({llama})")
    if focus_policy not in FOCUS_POLICIES:
        raise ConfigError(f"focus_policy must be one of {FOCUS_POLICIES}, got "
                          f"{focus_policy!r}")
    if kv_reuse not in KV_REUSE:
        raise ConfigError(f"kv_reuse must be one of {KV_REUSE}, got {kv_reuse!r}")
    if decode_focus not in DECODE_FOCUS:
        raise ConfigError(f"decode_focus must be one of {DECODE_FOCUS}, got "
                          f"{decode_focus!r}")
    mc = cfg.mc
    K = mc.block_size
    if mc.w_max % K:
        raise ConfigError(f"w_max ({mc.w_max}) must be a multiple of the block size K "
                          f"({K}): the working context is re-prefilled in chunks of K "
                          f"slots and K tokens are decoded between refocuses")
    batch_size = as_int(batch_size, "batch_size", minimum=1, exc=ConfigError)
    max_tokens = as_int(max_tokens, "max_tokens", exc=ConfigError)
    if max_tokens < mc.w_max:
        raise ConfigError(f"max_tokens ({max_tokens}) must be >= w_max ({mc.w_max})")
    pad_id = as_int(pad_id, "pad_id", exc=ConfigError)
    if not 0 <= pad_id < llama.vocab_size:
        raise ConfigError(f"pad_id {pad_id} is outside the vocabulary")
    wcm.check_config(mc)  # w_max holds the sink, the protected tail and a gist
    if collapse_headroom is None:  # default: an eighth of the budget, whole blocks
        collapse_headroom = (mc.w_max // 8) // K * K
    collapse_headroom = as_int(collapse_headroom, "collapse_headroom", exc=ConfigError)
    most = mc.w_max - mc.recent_protect - K - wcm.sink_tokens(mc)
    if not 0 <= collapse_headroom <= most:
        raise ConfigError(f"collapse_headroom must lie in [0, w_max - recent_protect - K - "
                          f"sink_blocks*K] = [0, {most}], got {collapse_headroom}")
    if prefill_chunk is None:  # default: the largest K·2^i <= 256 that divides w_max
        prefill_chunk = K
        while prefill_chunk * 2 <= max(256, K) and mc.w_max % (prefill_chunk * 2) == 0:
            prefill_chunk *= 2
    prefill_chunk = as_int(prefill_chunk, "prefill_chunk", exc=ConfigError)
    if prefill_chunk % K or mc.w_max % prefill_chunk or prefill_chunk <= 0:
        raise ConfigError(f"prefill_chunk ({prefill_chunk}) must be a positive multiple of "
                          f"K ({K}) that divides w_max ({mc.w_max})")
    plan = Plan(llama=llama, mc=mc, lens=cfg.lens, batch_size=int(batch_size),
                max_tokens=int(max_tokens), pad_id=int(pad_id),
                headroom=int(collapse_headroom), prefill_chunk=int(prefill_chunk),
                focus_policy=focus_policy,
                retrieval=cfg.retrieval if focus_policy in ("retrieval", "lens") else None,
                kv_reuse=kv_reuse, decode_focus=decode_focus)
    if plan.keeps_keys and max(plan.retrieval.layers) >= llama.num_layers:
        raise ConfigError(f"retrieval.layers {plan.retrieval.layers} exceed the base "
                          f"model's {llama.num_layers} layers")
    if focus_policy == "lens" and plan.lens.query_tokens \
            and plan.lens.query_layer > llama.num_layers:
        raise ConfigError(f"lens.query_layer {plan.lens.query_layer} exceeds the base "
                          f"model's {llama.num_layers} layers")
    return plan


def pending_base_position(plan: Plan, wc) -> jax.Array:
    """[B] position of the first pending slot (`working_context.next_position`)."""
    return wcm.next_position(wc, plan.mc)


def initial_state(plan: Plan) -> StreamState:
    """The state of B streams with no history (host arrays): empty WCs, an empty cache."""
    B, W, K, c = plan.batch_size, plan.mc.w_max, plan.mc.block_size, plan.llama
    kv_shape = (c.num_layers, B, W + K, c.num_kv_heads, c.head_dim)
    dt = np.dtype(jnp.dtype(c.dtype))
    return StreamState(
        wc=initial_layouts(plan, np.zeros(B, np.int64), np.zeros(B, bool)),
        cache=KVCache(k=np.zeros(kv_shape, dt), v=np.zeros(kv_shape, dt),
                      valid=np.zeros((B, W + K), bool)),
        next_token=np.full((B,), plan.pad_id, np.int32),
        pending=np.full((B, K), plan.pad_id, np.int32),
        num_pending=np.int32(0), done=np.zeros((B,), bool))


def empty_view(plan: Plan, key_width: int | None = None, key_dtype=None) -> TreeView:
    """An empty batched tree view of the plan's capacity (host arrays); `key_width` /
    `key_dtype`: the read-pass keys' row width and dtype when the trees keep them
    (`plan.keeps_keys`, `BlockKeys.width` / `.dtype`)."""
    B, D, L = plan.batch_size, plan.llama.hidden_size, plan.mc.num_levels
    if plan.keeps_keys != (key_width is not None):
        raise ValueError(f"plan.keeps_keys is {plan.keeps_keys}: key_width must be "
                         f"{'given' if plan.keeps_keys else 'None'}")
    gist_dtype = np.dtype(jnp.dtype(plan.mc.gist_dtype))
    return TreeView(
        tokens=np.zeros((B, plan.view_rows(0)), np.int32),
        gists=tuple(np.zeros((B, plan.view_rows(l), D), gist_dtype) for l in range(1, L + 1)),
        counts=np.zeros((B, L + 1), np.int32),
        keys=None if key_width is None else np.zeros((B, plan.view_rows(1), key_width),
                                                     key_dtype))


def initial_layouts(plan: Plan, num_tokens: Sequence[int], reset) -> wcm.WorkingContext:
    """Batched host WC: `wcm.initial_layout` of `num_tokens[b]` history tokens for each
    stream with `reset[b]`, else an empty WC."""
    B, W = plan.batch_size, plan.mc.w_max
    arrays = {k: np.zeros((B, W), np.int32) for k in ("level", "node", "edit_step",
                                                      "edit_dir")}
    valid = np.zeros((B, W), bool)
    tokens, step = np.zeros((B,), np.int32), np.zeros((B,), np.int32)
    for b in np.flatnonzero(np.asarray(reset, bool)):
        wc = jax.device_get(wcm.initial_layout(int(num_tokens[b]), plan.mc))
        for k in arrays:
            arrays[k][b] = getattr(wc, k)
        valid[b], tokens[b], step[b] = wc.valid, wc.num_tokens, wc.step
    return wcm.WorkingContext(valid=valid, num_tokens=tokens, step=step, **arrays)
