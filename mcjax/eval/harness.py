"""lm-eval-harness adapter: run lm-eval tasks against MegaContext and the plain base model.

`MegaContextLM` is an `lm_eval.api.model.LM` (registered as "megacontext") over
`mcjax.runtime.Session`:

- method="megacontext": each request's context is fed into a session stream (the whole
  context, however long: the tree ingests it, the working context holds at most `w_max`
  token-equivalents of it — raw tokens and gists — refocused by `focus_policy`).
- method="base": the plain base model over the last `base_window` context tokens (default
  `w_max`, the same attention budget: the *sliding-window* baseline of the README; pass a
  larger `base_window` for more context, up to the model's trained positions). The
  continuation / generated tokens come on top of the window, as MegaContext's pending
  tokens come on top of its working context.

Requests (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) are processed in
groups of `batch_size` (longest first; results come back in request order): one session
with `batch_size` streams per group, the last group padded with copies (one compiled
shape). Decoding is greedy (`do_sample` / `temperature` are ignored, with a warning).

Teacher-forced scoring (MegaContext). After the context is fed and the session has
refocused, the working context is materialized from the session's own device view of the
trees (`Session.materialized`, which syncs first), and one
base-model forward over `[WC slots ‖ the next K continuation tokens]` (K = block size =
the refocus cadence) scores those K tokens: the first from the WC's newest slot, each next
one from the previous continuation token, at the positions the session's pending tokens
use (`compact`: right after the WC; `absolute`: their token index). That is exactly the
distribution `Session.generate` samples the next K tokens from. A longer continuation is
then fed into the session (it refocuses as during generation, with the trigger of new
input) and the next K tokens are scored the same way. For a context that fits the working
context raw (all LOD0) this equals the plain base model's log-likelihood (tested).

`loglikelihood_rolling` (perplexity): MegaContext scores the whole document from the prefix
token on, K tokens at a time, each chunk fed before the next is scored — streaming
perplexity through the working context. The base method uses lm-eval's rolling windows of
`base_window` tokens (disjoint windows, each conditioned on the tokens before it in its
window).

Requires the optional extra: `pip install -e '.[harness]'` (pins lm_eval). CLI:
`python -m mcjax.eval.harness --model megacontext --model_args model=smollm2-135m,...
--tasks ...` (lm-eval's own CLI, with this model registered).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Sequence

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval import utils as lm_utils
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("mcjax.eval.harness needs lm-eval-harness (the optional extra): "
                      "pip install -e '.[harness]'") from e

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.base import model as base
from mcjax.base.model import InputError
from mcjax.checks import as_int
from mcjax.base.generate import GreedySampler
from mcjax.config import ConfigError, ExperimentConfig, LlamaConfig, get_config
from mcjax.nets import default_params, resolve_networks
from mcjax.runtime import FOCUS_POLICIES, Session
from mcjax.scoring import Context, continuation_positions, newest_slot, score_continuation, \
    token_logprobs

__all__ = ["MegaContextLM", "METHODS", "DEFAULT_MAX_GEN_TOKS", "DEFAULT_HARNESS_MAX_TOKENS",
           "score_continuations"]

METHODS = ("megacontext", "base")
DEFAULT_MAX_GEN_TOKS = 64  # generate_until without max_gen_toks in its gen_kwargs
DEFAULT_HARNESS_MAX_TOKENS = 1 << 15  # per-stream history capacity of a session (32,768)
_DEFAULT_CONFIG = {"smollm2-135m": "smollm2_135m_cpu"}  # experiments/generate.py's default


# --------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, emb, pos, valid, newest, cont, cont_pos, cont_mask, *,
           config: LlamaConfig):
    """Log-probabilities [B, C] and greedy hits [B, C] of continuation tokens `cont`
    [B, C] after a context of W slots (emb [B, W, D], pos / valid [B, W], its newest valid
    slot `newest` [B]), scored by `scoring.score_continuation` at positions `cont_pos`.
    Masked-out tokens score (0, True)."""
    logp = score_continuation(params, config, cont, cont_pos, cont_mask,
                              context=Context(emb, pos, valid), newest=newest)
    greedy = jnp.argmax(logp, -1) == cont
    return jnp.where(cont_mask, token_logprobs(logp, cont), 0.0), greedy | ~cont_mask


def _pad_rows(rows: Sequence[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    out = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
        mask[b, :len(r)] = True
    return out, mask


def score_continuations(session: Session, continuations: Sequence[np.ndarray], params
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced scores of one continuation per stream of `session` (module
    docstring): (sum of log-probabilities [B], all tokens greedy [B]).

    Each stream's history so far is the context. Scores K = block-size tokens at a time
    through the working context, then feeds those tokens (streams with more to score) so
    the session refocuses before the next K. An empty continuation scores (0.0, True).
    `params`: the base params on device (default: the session's own, via a fresh
    `device_put`). Leaves the session with the scored tokens in its history except the
    last chunk of each stream."""
    mc, llama = session.mc, session.llama
    K, B = mc.block_size, session.batch_size
    if len(continuations) != B:
        raise ValueError(f"got {len(continuations)} continuations for {B} streams")
    conts = [np.asarray(c, np.int64).reshape(-1) for c in continuations]
    total = np.zeros(B, np.float64)
    greedy = np.ones(B, bool)
    longest = max((len(c) for c in conts), default=0)
    for start in range(0, longest, K):
        emb, pos, valid = session.materialized()  # brings every WC up to date first
        wc = session.working_context
        chunk = [c[start:start + K] for c in conts]
        toks, mask = _pad_rows(chunk, K, 0)
        lp, gr = _score(params, emb, pos, valid, newest_slot(wc), jnp.asarray(toks),
                        continuation_positions(wc, mc, K), jnp.asarray(mask), config=llama)
        total += np.asarray(lp, np.float64).sum(1)
        greedy &= np.asarray(gr).all(1)
        more = [len(c) > start + K for c in conts]
        if any(more):
            session.feed([x if m else np.zeros((0,), np.int64) for x, m in zip(chunk, more)])
    return total, greedy


# --------------------------------------------------------------------------- the LM


def _as_int(x, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer argument (lm-eval's --model_args may pass digit strings); 2.9 or "2.9"
    is an error, never 2 (`mcjax.checks.as_int`)."""
    return as_int(x, what, minimum=minimum, maximum=maximum, allow_str=True)


def _overrides(overrides) -> list[str] | dict | None:
    """Config overrides: a dict, a list of "section.field=value", or one string of them
    separated by ';' (lm-eval's --model_args splits on ',')."""
    if overrides is None or isinstance(overrides, dict):
        return overrides
    if isinstance(overrides, str):
        return [o.strip() for o in overrides.split(";") if o.strip()]
    return list(overrides)


@register_model("megacontext")
class MegaContextLM(LM):
    """lm-eval-harness model over a MegaContext `Session` (module docstring).

    model: a `mcjax.base.loading.BaseModel` (has `encode`/`decode`), a `(LlamaConfig,
    params)` pair together with `encode` / `decode` callables (text ↔ token ids), or a
    shipped name / local HF directory (loaded with `load_base_model`; what lm-eval's CLI
    passes). config: an `ExperimentConfig` or a registered config name (default for the
    shipped SmolLM2: "smollm2_135m_cpu", as `experiments/generate.py`); `overrides` apply
    on top (a dict, a list of "section.field=value", or one ';'-separated string).
    method: "megacontext" or "base". focus_policy: a `Session` focus policy (default
    "lens": the shipped LensNet v2 when it fits). batch_size: streams per session
    (requests per group). max_tokens: each stream's history capacity (longer contexts
    keep their last tokens). max_gen_toks: default generation length. gist_params /
    lens_params: trained params, or None: the shipped GistNet / LensNet when they fit the
    config (else untrained), as `Session` does; gist_checkpoint / lens_checkpoint:
    training workdirs instead (`mcjax.nets.resolve_networks`). base_window: the
    base method's context window (default w_max). session_kwargs: more `Session`
    arguments (e.g. collapse_headroom). `device` and `max_batch_size` (lm-eval CLI) are
    ignored: JAX places the computation.

    After each group `last_session` is that group's session (for `focus_map`, `events`).
    """

    def __init__(self, model: Any = "smollm2-135m", config: ExperimentConfig | str | None = None,
                 *, method: str = "megacontext", focus_policy: str = "lens",
                 batch_size: int | str = 1, max_tokens: int = DEFAULT_HARNESS_MAX_TOKENS,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, base_window: int | None = None,
                 overrides=None, gist_params=None, lens_params=None,
                 gist_checkpoint: str | None = None, lens_checkpoint: str | None = None,
                 untrained: bool = False, encode: Callable[[str], Any] | None = None,
                 decode: Callable[[Sequence[int]], str] | None = None,
                 eos_id: int | None = None, prefix_token_id: int | None = None,
                 session_kwargs: dict | None = None, device: Any = None,
                 max_batch_size: Any = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if focus_policy not in FOCUS_POLICIES:
            raise ValueError(f"focus_policy must be one of {FOCUS_POLICIES}, got "
                             f"{focus_policy!r}")
        if isinstance(batch_size, str) and not batch_size.strip().isdigit():
            raise ValueError(f"batch_size must be an integer (got {batch_size!r}; 'auto' is "
                             f"not supported: the streams of a session share one KV cache)")
        self.method, self.focus_policy = method, focus_policy
        self.batch_size = _as_int(batch_size, "batch_size", 1)
        self.max_tokens = _as_int(max_tokens, "max_tokens", 1)
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks", 1)

        model_name = None
        if isinstance(model, str):
            from mcjax.base.loading import load_base_model

            model_name = model
            model = load_base_model(model)
        if hasattr(model, "config") and hasattr(model, "params"):
            llama, params = model.config, model.params
            encode = encode or getattr(model, "encode", None)
            decode = decode or getattr(model, "decode", None)
        else:
            try:
                llama, params = model
            except (TypeError, ValueError):
                raise TypeError("model must be a BaseModel, a (LlamaConfig, params) pair or a "
                                "model name / directory") from None
        if not isinstance(llama, LlamaConfig):
            raise TypeError(f"model config must be a LlamaConfig, got {type(llama).__name__}")
        if encode is None or decode is None:
            raise TypeError("text requests need a tokenizer: pass a BaseModel, or encode= and "
                            "decode= callables with a (LlamaConfig, params) pair")
        self._model = model
        self._encode_fn, self._decode_fn = encode, decode

        if config is None:
            name = _DEFAULT_CONFIG.get(model_name or "")
            if name is None:
                raise ConfigError("config is required (an ExperimentConfig or a registered "
                                  "config name) unless model is the shipped smollm2-135m")
            config = name
        cfg = get_config(config, _overrides(overrides)) if isinstance(config, str) else config
        if not isinstance(cfg, ExperimentConfig):
            raise TypeError(f"config must be an ExperimentConfig or a name, got "
                            f"{type(cfg).__name__}")
        if isinstance(config, ExperimentConfig) and overrides:
            from mcjax.config import override

            cfg = override(cfg, _overrides(overrides))
        if model_name is not None and model_name != cfg.base:
            cfg = dataclasses.replace(cfg, base=model_name)  # a local directory
        if cfg.base_config is None:
            cfg = dataclasses.replace(cfg, base_config=llama)
        self.cfg, self.mc, self.llama = cfg, cfg.mc, llama
        if self.max_tokens < self.mc.w_max:
            raise ConfigError(f"max_tokens ({self.max_tokens}) must be >= w_max "
                              f"({self.mc.w_max})")
        self.base_window = self.mc.w_max if base_window is None else _as_int(base_window,
                                                                             "base_window")
        if self.base_window < 1:
            raise ValueError(f"base_window must be >= 1, got {self.base_window}")
        V = llama.vocab_size
        self.eos_id = llama.eos_token_id if eos_id is None else _as_int(eos_id, "eos_id", 0,
                                                                        V - 1)
        if prefix_token_id is None:  # as lm-eval's HF model: BOS, else EOS
            prefix_token_id = llama.bos_token_id if llama.bos_token_id is not None \
                else self.eos_id
        if prefix_token_id is None:
            raise ValueError("the model has neither a BOS nor an EOS token id: pass "
                             "prefix_token_id (what an empty context becomes)")
        self.prefix_token_id = _as_int(prefix_token_id, "prefix_token_id", 0, V - 1)
        self.session_kwargs = dict(session_kwargs or {})
        self._params = jax.device_put(params)
        self.last_session: Session | None = None
        self.gist_params, self.lens_params, self.provenance = None, None, {}
        if method == "megacontext":
            self._resolve_networks(gist_params, lens_params, gist_checkpoint, lens_checkpoint,
                                   untrained)

    # ------------------------------------------------------------------ networks

    def _resolve_networks(self, gist_params, lens_params, gist_checkpoint, lens_checkpoint,
                          untrained: bool) -> None:
        """GistNet / LensNet params once for every group's session (Session's defaults)."""
        cfg, prov = self.cfg, {}
        if gist_checkpoint is not None or lens_checkpoint is not None:
            if gist_params is not None or lens_params is not None:
                raise ValueError("give params or checkpoints, not both")
            nets = resolve_networks(cfg, self._params, gist_checkpoint=gist_checkpoint,
                                    lens_checkpoint=lens_checkpoint)
            gist_params, lens_params = nets.gist, nets.lens
            prov = {"gist": nets.sources["gist"], "lens": nets.sources["lens"]}
        gist_params, lens_params, resolved = default_params(
            cfg, gist_params, lens_params, self._params, untrained=untrained,
            focus_policy=self.focus_policy)
        prov.update(resolved)
        self.gist_params, self.lens_params, self.provenance = gist_params, lens_params, prov

    def new_session(self) -> Session:
        """A fresh session with `batch_size` streams (every group gets one)."""
        kwargs = dict(batch_size=self.batch_size, max_tokens=self.max_tokens,
                      focus_policy=self.focus_policy, provenance=dict(self.provenance))
        kwargs.update(self.session_kwargs)
        session = Session((self.llama, self._params), self.gist_params, self.lens_params,
                          self.cfg, **kwargs)
        self.last_session = session
        return session

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, text: str) -> list[int]:
        """The text's token ids, each checked against the model's vocabulary (an id the
        model lacks is an `InputError` naming it, never a NaN score)."""
        if not text:
            return []
        ids = np.asarray(self._encode_fn(text)).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"the tokenizer returned {ids.dtype} ids, not integers")
        V = self.llama.vocab_size
        bad = ids[(ids < 0) | (ids >= V)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} (from the tokenizer, in {text[:40]!r}"
                             f"{'...' if len(text) > 40 else ''}) is outside the model's "
                             f"vocabulary [0, {V})")
        return [int(t) for t in ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn([int(t) for t in ids])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's HF model: trailing spaces of the context move to the continuation;
        the continuation's tokens are those of context+continuation after the context's."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx):]
        if whole[:len(ctx)] != ctx or not cont:  # the tokenizer merged across the boundary
            cont = self.tok_encode(continuation)
        return ctx, cont

    @property
    def eot_token_id(self) -> int | None:
        return self.eos_id

    @property
    def tokenizer_name(self) -> str:
        path = getattr(self._model, "path", None)
        return str(path).replace("/", "__") if path is not None else "mcjax-custom"

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        tok = getattr(self._model, "tokenizer", None)
        if tok is None or not hasattr(tok, "apply_chat_template"):
            raise NotImplementedError("this model has no tokenizer chat template")
        return tok.apply_chat_template(chat_history, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ grouping

    def _groups(self, n: int, key: Callable[[int], int]) -> list[list[int]]:
        """Request indices in groups of batch_size, longest first."""
        order = sorted(range(n), key=lambda i: -key(i))
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    def _padded(self, rows: list) -> list:
        return rows + [rows[-1]] * (self.batch_size - len(rows))

    def _progress(self, groups, desc: str, disable: bool):
        from tqdm import tqdm

        return tqdm(groups, desc=desc, disable=disable or len(groups) <= 1)

    # ------------------------------------------------------------------ log-likelihood

    def _loglik_tokens(self, pairs: list[tuple[list[int], list[int]]], *,
                       disable_tqdm: bool = False, desc: str = "loglikelihood"
                       ) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups = self._groups(len(pairs), lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for group in self._progress(groups, desc, disable_tqdm):
            rows = self._padded([pairs[i] for i in group])
            if self.method == "megacontext":
                logp, greedy = self._mc_loglik(rows)
            else:
                logp, greedy = self._base_loglik(rows)
            for j, i in enumerate(group):
                out[i] = (float(logp[j]), bool(greedy[j]))
        return out  # type: ignore[return-value]

    def _mc_loglik(self, rows):
        contexts, conts = [], []
        for ctx, cont in rows:
            if len(cont) >= self.max_tokens:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit a session "
                                 f"of max_tokens={self.max_tokens}")
            ctx = ctx[-(self.max_tokens - len(cont)):] if ctx else [self.prefix_token_id]
            contexts.append(np.asarray(ctx, np.int64))
            conts.append(np.asarray(cont, np.int64))
        session = self.new_session()
        session.feed(contexts)
        return score_continuations(session, conts, self._params)

    def _base_loglik(self, rows):
        W = self.base_window
        windows = [np.asarray((ctx or [self.prefix_token_id])[-W:], np.int64) for ctx, _ in rows]
        longest = max(len(c) for _, c in rows)
        C = max(8, 1 << max(0, longest - 1).bit_length())  # bucketed: few compiled shapes
        ctx, valid = _pad_rows(windows, W, 0)
        cont, mask = _pad_rows([np.asarray(c, np.int64) for _, c in rows], C, 0)
        n = valid.sum(1)
        emb = base.embed_tokens(self._params, jnp.asarray(ctx))
        pos = np.where(valid, np.arange(W)[None], 0)
        lp, gr = _score(self._params, emb, jnp.asarray(pos, jnp.int32), jnp.asarray(valid),
                        jnp.asarray(n - 1, jnp.int32), jnp.asarray(cont),
                        jnp.asarray(n[:, None] + np.arange(C)[None], jnp.int32),
                        jnp.asarray(mask), config=self.llama)
        return np.asarray(lp, np.float64).sum(1), np.asarray(gr).all(1)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._loglik_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        if self.method == "megacontext":  # the whole document streams through one stream
            pairs = [([self.prefix_token_id], d) for d in docs]
            owner = list(range(len(docs)))
        else:  # lm-eval's rolling windows of base_window tokens
            pairs, owner = [], []
            for i, d in enumerate(docs):
                for w in lm_utils.get_rolling_token_windows(
                        token_list=d, prefix_token=self.prefix_token_id,
                        max_seq_len=self.base_window, context_len=1):
                    ctx, cont = lm_utils.make_disjoint_window(w)
                    pairs.append((list(ctx), list(cont)))
                    owner.append(i)
        scored = self._loglik_tokens(pairs, disable_tqdm=disable_tqdm,
                                     desc="loglikelihood_rolling")
        totals = [0.0] * len(docs)
        for i, (lp, _) in zip(owner, scored):
            totals[i] += lp
        for req, res in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return totals

    # ------------------------------------------------------------------ generation

    def _gen_kwargs(self, kwargs) -> tuple[list[str], int]:
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"gen_kwargs must be a dict (until, max_gen_toks, ...), got "
                             f"{kwargs!r}")
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str)
                                                              for u in until):
            raise ValueError(f"gen_kwargs 'until' must be a string or a list of strings, got "
                             f"{until!r}")
        until = [u for u in until if u]
        if self.eos_id is not None:
            eos_text = self.tok_decode([self.eos_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
        n = _as_int(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks", 1)
        if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
            warnings.warn("MegaContextLM decodes greedily: do_sample / temperature ignored",
                          stacklevel=3)
        return until, n

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> str:
        for u in until:
            i = text.find(u)
            if i >= 0:
                text = text[:i]
        return text

    def _trim(self, tokens) -> list[int]:
        out = []
        for t in np.asarray(tokens).reshape(-1).tolist():
            if self.eos_id is not None and t == self.eos_id:
                break
            out.append(int(t))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        contexts = [self.tok_encode(req.args[0]) or [self.prefix_token_id] for req in requests]
        specs = [self._gen_kwargs(req.args[1] if len(req.args) > 1 else None)
                 for req in requests]
        out: list[str | None] = [None] * len(requests)
        groups = self._groups(len(requests), lambda i: len(contexts[i]))
        for group in self._progress(groups, "generate_until", disable_tqdm):
            idx = self._padded(list(group))
            ctxs = [contexts[i] for i in idx]
            until = [specs[i][0] for i in idx]
            limits = [specs[i][1] for i in idx]
            if self.method == "megacontext":
                texts = self._mc_generate(ctxs, until, limits)
            else:
                texts = self._base_generate(ctxs, until, limits)
            for j, i in enumerate(group):
                out[i] = texts[j]
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[j])
        return out  # type: ignore[return-value]

    def _mc_generate(self, ctxs, until, limits) -> list[str]:
        n = max(limits)
        if n >= self.max_tokens:
            raise ValueError(f"max_gen_toks {n} does not fit a session of max_tokens="
                             f"{self.max_tokens}")
        session = self.new_session()
        session.feed([np.asarray(c[-(self.max_tokens - n):], np.int64) for c in ctxs])
        B = self.batch_size
        tokens: list[list[int]] = [[] for _ in range(B)]
        finished = np.zeros(B, bool)
        eos = -1 if self.eos_id is None else self.eos_id
        for block in session.stream(n, eos_id=self.eos_id):
            for b in range(B):
                if finished[b]:
                    continue
                for t in block[b].tolist():
                    if t == eos or len(tokens[b]) >= limits[b]:
                        finished[b] = True
                        break
                    tokens[b].append(int(t))
                if not finished[b] and until[b]:
                    text = self.tok_decode(tokens[b])
                    finished[b] = any(u in text for u in until[b])
            if finished.all():
                break
        return [self._cut(self.tok_decode(t[:lim]), u)
                for t, lim, u in zip(tokens, limits, until)]

    def _base_generate(self, ctxs, until, limits) -> list[str]:
        W, n = self.base_window, max(limits)
        windows = [np.asarray(c[-W:], np.int64) for c in ctxs]
        prompt, _ = _pad_rows(windows, W, 0)
        sampler = GreedySampler(self.llama, max_new_tokens=n, max_prompt_len=W,
                                eos_id=self.eos_id)
        gen, _ = sampler.generate(self._params, prompt, np.asarray([len(w) for w in windows]))
        return [self._cut(self.tok_decode(self._trim(g)[:lim]), u)
                for g, lim, u in zip(gen, limits, until)]


def main() -> None:
    """lm-eval's CLI with the "megacontext" model registered (`python -m
    mcjax.eval.harness --model megacontext --model_args ... --tasks ...`)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
