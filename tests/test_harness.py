"""lm-eval-harness adapter (`mcjax.eval.harness`) on the tiny random Llama with a toy
character tokenizer: hand-made `Instance` requests (no hub, no task downloads)."""

import dataclasses

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from mcjax.base import model as base  # noqa: E402
from mcjax.config import TINY_LLAMA, get_config  # noqa: E402
from mcjax.eval.harness import MegaContextLM  # noqa: E402

# As tests/test_runtime.py: K = 16, w_max 96 (a multiple of K); every MegaContext session
# of this file shares one plan (batch 2, max_tokens 1024), so the programs compile once.
OVERRIDES = {"mc.w_max": 96, "mc.block_size": 16, "mc.recent_protect": 32}
W, K = 96, 16
# Short contexts stay below w_max - K slots, so the working context holds them raw.
SHORT = ["The cat sat", "on the mat near", "a big red door!"]


def encode(text: str) -> np.ndarray:
    """A bijective toy tokenizer: token id t <-> the character chr(t) (ids < 263)."""
    ids = np.asarray([ord(ch) for ch in text], np.int32)
    assert (ids < TINY_LLAMA.vocab_size).all()
    return ids


def decode(ids) -> str:
    return "".join(chr(int(t)) for t in ids)


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(get_config("tiny", OVERRIDES), base_config=TINY_LLAMA)


def _lm(tiny_llama, cfg, method="megacontext", **kw):
    return MegaContextLM(tiny_llama, cfg, method=method, batch_size=2, max_tokens=1024,
                         encode=encode, decode=decode, untrained=True, **kw)


@pytest.fixture(scope="module")
def mc_lm(tiny_llama, cfg):
    return _lm(tiny_llama, cfg)


@pytest.fixture(scope="module")
def base_lm(tiny_llama, cfg):
    return _lm(tiny_llama, cfg, method="base")


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _reference_loglik(tiny_llama, context: str, continuation: str):
    """Plain base model over the whole context + continuation: (sum logprob, greedy)."""
    config, params = tiny_llama
    ctx, cont = encode(context), encode(continuation)
    ids = np.concatenate([ctx, cont])[None]
    logp = np.asarray(jax.nn.log_softmax(base.forward(params, config, tokens=ids), -1))[0]
    rows = np.arange(len(ctx) - 1, len(ids[0]) - 1)
    return float(logp[rows, cont].sum()), bool((logp[rows].argmax(-1) == cont).all())


def test_is_an_lm_eval_model(mc_lm):
    from lm_eval.api.registry import get_model

    assert isinstance(mc_lm, LM)
    assert get_model("megacontext") is MegaContextLM


def test_generate_until_keeps_request_order_and_honours_until(mc_lm, base_lm):
    # 3 requests, batch_size 2: two sessions, the second padded with a copy
    args = [(c, {"max_gen_toks": 20, "until": []}) for c in SHORT]
    full = mc_lm.generate_until(_requests("generate_until", args))
    assert len(full) == 3 and all(isinstance(t, str) and t for t in full)
    # order: the same requests permuted give the same texts permuted
    perm = [2, 0, 1]
    permuted = mc_lm.generate_until(_requests("generate_until", [args[i] for i in perm]))
    assert permuted == [full[i] for i in perm]
    # context + generated text fit the WC raw: MegaContext == the plain base model
    assert base_lm.generate_until(_requests("generate_until", args)) == full
    # until: cut before the first occurrence of the stop string (a char from the middle)
    stops = [t[len(t) // 2] for t in full]
    cut = mc_lm.generate_until(_requests(
        "generate_until", [(c, {"max_gen_toks": 20, "until": [s]}) for c, s in zip(SHORT, stops)]))
    assert cut == [t[:t.index(s)] for t, s in zip(full, stops)]
    assert all(len(c) < len(t) for c, t in zip(cut, full))
    # max_gen_toks: the first 3 tokens (one character each) of the full generation
    short = mc_lm.generate_until(_requests("generate_until",
                                           [(c, {"max_gen_toks": 3}) for c in SHORT]))
    assert short == [t[:3] for t in full]


def test_loglikelihood_equals_the_base_model_for_short_contexts(tiny_llama, mc_lm, base_lm):
    # one continuation longer than K (scored in two chunks, the first fed in between)
    pairs = [("The cat sat", " on the mat"), ("Hello", " world, this is longer than K!"),
             ("a big red door", " opens"), ("", "an empty context")]
    reqs = _requests("loglikelihood", pairs)
    got_mc = mc_lm.loglikelihood(reqs)
    got_base = base_lm.loglikelihood(reqs)
    for (ctx, cont), mc, bs in zip(pairs, got_mc, got_base):
        if not ctx:  # an empty context becomes the prefix token (BOS)
            config, params = tiny_llama
            ids = np.concatenate([[config.bos_token_id], encode(cont)])[None]
            logp = np.asarray(jax.nn.log_softmax(base.forward(params, config, tokens=ids), -1))
            ref = (float(logp[0, np.arange(len(cont)), ids[0, 1:]].sum()), None)
        else:
            ref = _reference_loglik(tiny_llama, ctx, cont)
        assert np.isfinite(mc[0]) and mc[0] < 0
        np.testing.assert_allclose(mc[0], ref[0], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(bs[0], ref[0], rtol=1e-4, atol=1e-3)
        if ref[1] is not None:
            assert mc[1] == bs[1] == ref[1]
    # a greedy continuation is recognised as greedy
    ctx = "The cat sat"
    greedy = mc_lm.generate_until(_requests("generate_until", [(ctx, {"max_gen_toks": 5})]))[0]
    (lp, is_greedy), = mc_lm.loglikelihood(_requests("loglikelihood", [(ctx, greedy)]))
    assert is_greedy and lp < 0


def test_long_context_goes_through_gists(mc_lm, base_lm):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]
    long_ctx = " ".join(rng.choice(words, 90))  # ~500 bytes: > 5 w_max
    assert len(encode(long_ctx)) > 5 * W
    pairs = [(long_ctx, " alpha beta"), (long_ctx[:300], " gamma"), ("short", " one")]
    res = mc_lm.loglikelihood(_requests("loglikelihood", pairs))
    assert all(np.isfinite(lp) and lp < 0 for lp, _ in res)
    session = mc_lm.last_session  # the last group: the short request, padded
    counts = [session.tree(b).counts for b in range(session.batch_size)]
    assert counts[0][0] == len(encode("short"))
    # the long request really was compressed: a session of its group holds gists
    lone = mc_lm.new_session()
    lone.feed([encode(long_ctx), encode("x")])
    levels = lone.working_context.level[0][lone.working_context.valid[0]]
    assert (levels > 0).any() and lone.working_context.valid[0].sum() <= W
    # ... and MegaContext differs from the sliding window there (it sees older text)
    base_res = base_lm.loglikelihood(_requests("loglikelihood", pairs[:1]))
    assert np.isfinite(base_res[0][0]) and abs(base_res[0][0] - res[0][0]) > 1e-4
    # teacher-forced scoring through gists is the distribution the session decodes from:
    # its greedy continuation (K tokens: one working context) scores as greedy
    gen = mc_lm.generate_until(_requests("generate_until", [(long_ctx, {"max_gen_toks": K}),
                                                            (long_ctx[:300], {"max_gen_toks": K})]))
    assert [len(g) for g in gen] == [K, K]  # one token per character (no EOS here)
    scored = mc_lm.loglikelihood(_requests("loglikelihood", [(long_ctx, gen[0]),
                                                             (long_ctx[:300], gen[1])]))
    assert [g for _, g in scored] == [True, True]
    # a non-greedy continuation is not
    other = [chr(ord("a") + (ord(ch) - ord("a") + 1) % 26) for ch in gen[0][:4]]
    (_, g), = mc_lm.loglikelihood(_requests("loglikelihood", [(long_ctx, "".join(other))]))
    assert not g


def test_loglikelihood_rolling(tiny_llama, mc_lm, base_lm):
    doc = "a short document"  # shorter than w_max: both equal the plain model from BOS
    config, params = tiny_llama
    ids = np.concatenate([[config.bos_token_id], encode(doc)])[None]
    logp = np.asarray(jax.nn.log_softmax(base.forward(params, config, tokens=ids), -1))[0]
    ref = float(logp[np.arange(len(doc)), ids[0, 1:]].sum())
    reqs = _requests("loglikelihood_rolling", [(doc,)])
    np.testing.assert_allclose(mc_lm.loglikelihood_rolling(reqs)[0], ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(base_lm.loglikelihood_rolling(reqs)[0], ref, rtol=1e-4,
                               atol=1e-3)
    long_doc = "word " * 60  # 300 tokens: base windows of 96 tokens, MegaContext streams
    reqs = _requests("loglikelihood_rolling", [(long_doc,)])
    mc, bs = mc_lm.loglikelihood_rolling(reqs)[0], base_lm.loglikelihood_rolling(reqs)[0]
    assert np.isfinite(mc) and np.isfinite(bs) and mc < 0 and bs < 0


def test_arguments(tiny_llama, cfg):
    # what lm-eval's --model_args gives: a config name, ';'-separated overrides, strings
    lm = MegaContextLM(tiny_llama, "tiny", method="base", batch_size="3", encode=encode,
                       decode=decode, overrides="mc.w_max=96;mc.block_size=16;"
                                                "mc.recent_protect=32", device="cpu")
    assert (lm.mc.w_max, lm.mc.block_size, lm.batch_size, lm.base_window) == (96, 16, 3, 96)
    assert lm.prefix_token_id == TINY_LLAMA.bos_token_id
    with pytest.raises(ValueError, match="method"):
        _lm(tiny_llama, cfg, method="nope")
    with pytest.raises(ValueError, match="auto"):
        MegaContextLM(tiny_llama, cfg, batch_size="auto", encode=encode, decode=decode)
    with pytest.raises(TypeError, match="tokenizer"):
        MegaContextLM(tiny_llama, cfg)


def test_out_of_vocabulary_ids_are_a_clear_error_not_nan(tiny_llama, cfg):
    """A tokenizer giving an id the model lacks (here chr(300) on a 263-token vocabulary)
    is an error naming the id, in a continuation (both methods) and in a context — never
    (nan, False)."""
    bad = chr(300)

    def unchecked(text):
        return np.asarray([ord(ch) for ch in text], np.int32)

    for method in ("megacontext", "base"):
        lm = MegaContextLM(tiny_llama, cfg, method=method, batch_size=2, max_tokens=1024,
                           encode=unchecked, decode=decode, untrained=True)
        for args in (("The cat sat", " on" + bad), ("The cat" + bad, " sat")):
            with pytest.raises(ValueError, match="token id 300 .*vocabulary"):
                lm.loglikelihood(_requests("loglikelihood", [args]))
        with pytest.raises(ValueError, match="token id 300"):
            lm.generate_until(_requests("generate_until", [("ab" + bad, {"until": ["x"]})]))


def test_counts_and_ids_are_refused_not_truncated(tiny_llama, cfg, base_lm):
    for kw, match in (({"eos_id": 128.5}, "eos_id must be an integer"),
                      ({"eos_id": 2 ** 40}, "eos_id must be <="),
                      ({"max_gen_toks": 2.9}, "max_gen_toks must be an integer"),
                      ({"batch_size": 1.5}, "batch_size must be an integer"),
                      ({"prefix_token_id": -2}, "prefix_token_id must be >= 0")):
        kw = {"batch_size": 2, **kw}
        with pytest.raises(ValueError, match=match):
            MegaContextLM(tiny_llama, cfg, method="base", max_tokens=1024, encode=encode,
                          decode=decode, **kw)
    for gen_kwargs, match in (({"max_gen_toks": 2.9}, "max_gen_toks must be an integer"),
                              ({"until": [5]}, "until"), ("stop", "gen_kwargs")):
        with pytest.raises(ValueError, match=match):
            base_lm.generate_until(_requests("generate_until", [("ab", gen_kwargs)]))
