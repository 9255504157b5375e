"""Streaming runtime: invariants and zero recompiles while streaming 20 × w_max tokens,
equality with the plain base model while the WC is all LOD0, chunking invariance, batch ==
alone, sharded == unsharded, clear errors."""

import collections
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.base.generate import GreedySampler
from mcjax.checkpoint import CheckpointError, CheckpointMismatchError, Checkpointer
from mcjax.config import TINY_LLAMA, ConfigError, get_config
from mcjax.runtime import CompileCounter, InputError, Session, load_trained_params, \
    untrained_params
from mcjax.sharding import make_mesh
from mcjax.working_context import CapacityError

# K = 16 keeps LOD2 (256 tokens) reachable in short streams; w_max a multiple of K.
OVERRIDES = {"mc.w_max": 96, "mc.block_size": 16, "mc.recent_protect": 32}
W, K = 96, 16
MAX_TOKENS = 4096  # fixed per-stream view capacity: every test session shares one plan
HEADROOM = 2 * K  # collapse ahead to 2 free blocks (the default, w_max/8, is 0 blocks here)


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(get_config("tiny", OVERRIDES), base_config=TINY_LLAMA)


@pytest.fixture(scope="module")
def nets(cfg):
    """(gist, lens) params: untrained, as the trainers start (one init per test run)."""
    return untrained_params(cfg, "gist"), untrained_params(cfg, "lens")


def _session(tiny_llama, cfg, nets, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("collapse_headroom", HEADROOM)
    return Session(tiny_llama, nets[0], nets[1], cfg, **kw)


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(3, TINY_LLAMA.vocab_size, n)


def _stream_20x_w_max(tiny_llama, cfg, nets):
    """Feed 20·w_max tokens in pieces of 3K, generating K tokens after each piece. The
    warm-up runs until the first LOD2 gist (K² = 256 tokens: 4 rounds of 4K); compilations
    are counted over the remaining 36 rounds."""
    session = _session(tiny_llama, cfg, nets, debug_invariants=True)
    pieces = np.split(_tokens(0, 20 * W), 20 * W // (3 * K))
    outputs = []
    for piece in pieces[:4]:
        session.feed(piece)
        outputs.append(session.generate(K))
    assert session.tree().counts[2] == 1
    with CompileCounter() as compiles:
        for piece in pieces[4:]:
            session.feed(piece)
            outputs.append(session.generate(K))
    return session, np.concatenate(outputs, 1), compiles


def test_session_fed_20x_w_max_keeps_invariants_never_recompiles_and_repeats(
        tiny_llama, cfg, nets):
    first, out1, compiles = _stream_20x_w_max(tiny_llama, cfg, nets)
    assert compiles.count == 0, f"recompiled after warm-up: {compiles.names}"
    assert first.compiled_programs() == {"decode": 1, "refocus": 1, "write_view": 2,
                                         "force": 0}
    first.check()  # debug_invariants also checked after each of the refocuses
    events = list(first.events)
    assert len(events) == 2 * (20 * W // (3 * K))  # one after each feed, one per K decoded
    history = 20 * W + out1.shape[1]
    assert first.num_tokens.tolist() == [history]
    last = events[-1]
    assert last.num_tokens == [history] and history > 20 * W
    assert last.lod_histogram[0][2] > 0  # LOD2 gists: the history really is compressed
    assert all(0 < e.budget_use[0] <= 1.0 for e in events)
    assert all(n % K == 0 for e in events for n in e.reprefill_slots)
    assert abs(sum(last.residency[0]) - 1.0) < 1e-4
    assert any(e.headroom_collapses[0] for e in events)  # collapsing ahead of need happens

    second, out2, _ = _stream_20x_w_max(tiny_llama, cfg, nets)
    np.testing.assert_array_equal(out1, out2)
    assert [e.actions for e in events] == [e.actions for e in second.events]
    np.testing.assert_array_equal(first.working_context.node, second.working_context.node)


def test_all_lod0_session_equals_plain_greedy_generation(tiny_llama, cfg, nets):
    config, params = tiny_llama
    quiet_lens = jax.tree.map(lambda x: x, nets[1])  # a LensNet that never asks for edits
    quiet_lens["head"] = jax.tree.map(jnp.zeros_like, quiet_lens["head"])
    session = _session(tiny_llama, cfg, (nets[0], quiet_lens))
    # 90 tokens <= w_max; at every refocus (29, 45, 61, 77 tokens) a block still fits, so
    # nothing collapses, not even ahead of need: the WC stays all LOD0.
    prompt, n = _tokens(1, 29), 61
    session.feed(prompt)
    out = session.generate(n)
    reference, _ = GreedySampler(config, max_new_tokens=n, max_prompt_len=len(prompt)
                                 ).generate(params, prompt)
    assert out[0].tolist() == reference[0].tolist()
    assert len(session.events) == 1 + n // K  # the refocuses really ran
    assert all(e.lod_histogram[0][1:] == [0, 0] and e.actions == [[]] for e in session.events)
    # appending decoded tokens reuses their KV entries: nothing is re-prefilled
    decoded = [e for e in session.events if e.trigger == "decode"]
    assert all(e.kv_reused == [True] and e.reprefill_slots == [0] for e in decoded)


def test_feeding_a_text_in_pieces_equals_feeding_it_at_once(tiny_llama, cfg, nets):
    tokens = _tokens(2, 5 * W + 7)
    whole = _session(tiny_llama, cfg, nets)
    whole.feed(tokens)
    out_whole = whole.generate(2 * K + 3)

    pieces = _session(tiny_llama, cfg, nets)
    for piece in np.split(tokens, [1, 5, 40, 41, 200, 333]):
        pieces.feed(piece.tolist())
    # generating in pieces equals generating at once too
    out_pieces = np.concatenate([pieces.generate(5), pieces.generate(2 * K - 2)], 1)
    np.testing.assert_array_equal(out_whole, out_pieces)
    for level in (1, 2):
        np.testing.assert_array_equal(whole.tree().gists(level), pieces.tree().gists(level))
    np.testing.assert_array_equal(whole.working_context.node, pieces.working_context.node)
    np.testing.assert_array_equal(whole.working_context.level, pieces.working_context.level)


def _two_streams():
    return [_tokens(3, 37), _tokens(4, 700)]  # one all-LOD0, one compressed


def test_batch_of_streams_of_different_lengths_equals_each_alone(tiny_llama, cfg, nets):
    prompts, n = _two_streams(), 2 * K + 5
    batch = _session(tiny_llama, cfg, nets, batch_size=2)
    batch.feed(prompts)
    out = batch.generate(n)
    more = [_tokens(5, 50), _tokens(6, 3)]
    batch.feed(more)
    out_more = batch.generate(K)
    for b in range(2):
        alone = _session(tiny_llama, cfg, nets)
        alone.feed(prompts[b])
        assert alone.generate(n)[0].tolist() == out[b].tolist()
        alone.feed(more[b])
        assert alone.generate(K)[0].tolist() == out_more[b].tolist()
        assert alone.events[-1].actions[0] == batch.events[-1].actions[b]


def test_streams_stop_at_eos_independently(tiny_llama, cfg, nets):
    prompts = _two_streams()
    free = _session(tiny_llama, cfg, nets, batch_size=2)
    free.feed(prompts)
    ref = free.generate(K + 4)
    eos = int(ref[0, 3])  # pretend stream 0's fourth token is EOS
    batch = _session(tiny_llama, cfg, nets, batch_size=2)
    batch.feed(prompts)
    out = batch.generate(K + 4, eos_id=eos)
    for b in range(2):
        hits = np.flatnonzero(ref[b] == eos)
        stop = hits[0] + 1 if len(hits) else ref.shape[1]
        assert out[b, :stop].tolist() == ref[b, :stop].tolist()
        assert (out[b, stop:] == 0).all()


def test_a_generation_after_one_that_stopped_at_eos_runs_again(tiny_llama, cfg, nets):
    """`done` belongs to one generation: generate(n, eos_id=E) that stops at E, then
    generate(n) must give n tokens (it returned 0 when the flag survived the call)."""
    s = _session(tiny_llama, cfg, nets, batch_size=1)
    s.feed(_tokens(5, 3 * K))
    first = s.generate(8)
    s2 = _session(tiny_llama, cfg, nets, batch_size=1)
    s2.feed(_tokens(5, 3 * K))
    stopped = s2.generate(8, eos_id=int(first[0, 0]))
    assert stopped.shape[1] == 1  # EOS emitted first: the generation ended there
    again = s2.generate(8)
    assert again.shape == (1, 8)


def test_a_decode_refocus_is_read_only_after_the_next_block_is_dispatched(tiny_llama, cfg,
                                                                          nets):
    """Non-blocking telemetry: the refocus after K decoded tokens is dispatched and the next
    decode block is dispatched behind it before the host waits for the refocus's telemetry;
    every refocus still has its event, in order, when `generate` returns."""
    s = _session(tiny_llama, cfg, nets)
    s.feed(_tokens(7, 3 * K))
    ref = _session(tiny_llama, cfg, nets)
    ref.feed(_tokens(7, 3 * K))
    order = []
    decode = s._programs.decode

    def spy(*args):
        order.append("D")
        return decode(*args)

    s._programs = s._programs._replace(decode=spy)
    s.on_event = lambda e: order.append(e.trigger)
    out = s.generate(3 * K)
    assert order == ["input", "D", "D", "decode", "D", "decode", "decode"]
    assert [e.index for e in s.events] == [0, 1, 2, 3]
    assert all(e.timings["refocus_s"] > 0 for e in s.events)
    np.testing.assert_array_equal(out, ref.generate(3 * K))
    assert [e.actions for e in s.events] == [e.actions for e in ref.events]
    order.clear()
    s.generate(2 * K)  # no input: nothing to sync, the first block starts at once
    assert order == ["D", "D", "decode", "decode"]


def test_a_refocus_that_overflows_raises_and_leaves_the_state_as_it_was(tiny_llama, cfg,
                                                                        nets):
    """The refocus program's input state is donated: when a stream cannot absorb its new
    tokens, the state the session keeps must be the one before the refocus (it was the
    half-applied one), so the error is clean and the session goes on as if it never ran."""
    import jax as _jax

    from mcjax import working_context as wcm

    def fresh():
        s = _session(tiny_llama, cfg, nets, batch_size=1)
        s.feed(_tokens(9, 700))
        s.generate(5)
        return s

    s, ref = fresh(), fresh()
    entries = wcm.to_entries(_jax.tree.map(lambda x: x[0], s.working_context))
    huge = np.asarray([400_000])  # far more than any layout of w_max slots can cover
    with pytest.raises(CapacityError, match="could not absorb"):
        s._refocus(huge, np.zeros(1, bool), s._empty_layout, revive=np.zeros(1, bool),
                   trigger="input", timings={})
    assert wcm.to_entries(_jax.tree.map(lambda x: x[0], s.working_context)) == entries
    s.check()
    np.testing.assert_array_equal(s.generate(2 * K), ref.generate(2 * K))


def test_check_compares_the_cache_with_a_fresh_prefill_of_the_working_context(
        tiny_llama, cfg, nets):
    """check() passes mid-generation (pending tokens in the cache) and catches a cache
    whose validity bits are right but whose keys, values or next token are not."""
    from mcjax.working_context import InvariantError

    s = _session(tiny_llama, cfg, nets, batch_size=2)
    s.feed(_two_streams())
    s.generate(K + 5)  # a refocus, then 5 pending tokens
    s.check()
    good = s._state
    for part in ("k", "v"):
        bad = getattr(good.cache, part).at[:, 1, 3].add(0.5)
        s._state = good.replace(cache=good.cache.replace(**{part: bad}))
        with pytest.raises(InvariantError, match="fresh prefill"):
            s.check()
    s._state = good.replace(next_token=(good.next_token + 1) % TINY_LLAMA.vocab_size)
    with pytest.raises(InvariantError, match="next_token"):
        s.check()
    s._state = good
    s.check()


def test_sharded_decode_on_an_8_device_mesh_equals_unsharded(tiny_llama, cfg, nets):
    assert len(jax.devices()) == 8
    prompts, n = _two_streams(), K + 3
    plain = _session(tiny_llama, cfg, nets, batch_size=2)
    plain.feed(prompts)
    expected = plain.generate(n)
    mesh = make_mesh((2, 4))
    sharded = _session(tiny_llama, cfg, nets, batch_size=2, mesh=mesh)
    sharded.feed(prompts)
    np.testing.assert_array_equal(sharded.generate(n), expected)
    state = sharded._state
    assert state.cache.k.sharding.spec[:2] == (None, "data")
    assert state.wc.level.sharding.spec[0] == "data"
    q = sharded._params["layers"]["q_proj"]["kernel"]
    assert "model" in tuple(q.sharding.spec)


def test_bad_input_is_a_clear_error(tiny_llama, cfg, nets, tmp_path):
    config, params = tiny_llama
    with_text = types.SimpleNamespace(
        config=config, params=params,
        encode=lambda s: np.frombuffer(s.encode(), np.uint8).astype(np.int32))
    session = Session(with_text, nets[0], nets[1], cfg, max_tokens=MAX_TOKENS)
    with pytest.raises(InputError, match="empty input"):
        session.feed("")
    with pytest.raises(InputError, match="empty input"):
        session.feed([])
    with pytest.raises(InputError, match="no history"):
        session.generate(3)
    with pytest.raises(InputError, match="outside the vocabulary"):
        session.feed([1, config.vocab_size])
    with pytest.raises(CapacityError, match="max_tokens"):
        session.feed(np.ones(MAX_TOKENS + 1, np.int32))
    pair = _session(tiny_llama, cfg, nets, batch_size=2)
    with pytest.raises(InputError, match="empty input"):
        pair.feed([[], []])
    with pytest.raises(InputError, match="one input per stream"):
        pair.feed([5, 6, 7])
    with pytest.raises(ConfigError, match="multiple of the block size"):
        bad = dataclasses.replace(cfg, mc=dataclasses.replace(cfg.mc, w_max=100))
        Session(tiny_llama, nets[0], nets[1], bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        Session.from_checkpoints(tiny_llama, cfg, gist_checkpoint=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        Session.from_checkpoints(tiny_llama, cfg, lens_checkpoint=tmp_path)


def _save_checkpoint(workdir, cfg, params):
    from mcjax.train.steps import init_state, make_optimizer

    ckpt = Checkpointer(workdir)
    ckpt.save(3, init_state(params, make_optimizer(cfg.train)), {}, cfg, {"run": "train_gist"})
    ckpt.wait()
    ckpt.close()


def test_checkpoints_load_and_one_for_another_base_model_is_refused(tiny_llama, cfg, nets,
                                                                    tmp_path):
    trained = jax.tree.map(lambda x: x + 0.5, nets[0])
    _save_checkpoint(tmp_path / "gist", cfg, {"gist": trained})
    params, source = load_trained_params(tmp_path / "gist", cfg, "gist")
    assert source["step"] == 3 and source["source"] == "checkpoint"
    jax.tree.map(np.testing.assert_array_equal, params, trained)
    session = Session.from_checkpoints(tiny_llama, cfg, gist_checkpoint=tmp_path / "gist",
                                       max_tokens=MAX_TOKENS)
    assert session.untrained == ("lens",)
    with pytest.raises(CheckpointError, match="holds no lens params"):
        load_trained_params(tmp_path / "gist", cfg, "lens")

    other_base = dataclasses.replace(TINY_LLAMA, vocab_size=TINY_LLAMA.vocab_size + 6)
    _save_checkpoint(tmp_path / "other", dataclasses.replace(cfg, base_config=other_base),
                     {"gist": nets[0]})
    with pytest.raises(CheckpointMismatchError, match="base_config.vocab_size"):
        Session.from_checkpoints(tiny_llama, cfg, gist_checkpoint=tmp_path / "other")


def test_session_with_a_hidden_input_gistnet_gists_the_read_pass(tiny_llama, cfg, nets):
    """GistConfig.input="hidden": the trees' LOD1 gists are GistNet over the base model's
    read-pass hidden states (`layer_hidden` of the whole history, chunks aligned to its
    start), however the history arrived — fed in pieces and generated — and the WC keeps
    every invariant, the sink included."""
    from mcjax.base.model import layer_hidden
    from mcjax.gist import gist_blocks

    config, params = tiny_llama
    gcfg = dataclasses.replace(cfg.gist, input="hidden", input_layer=2, read_chunk=64)
    hidden_cfg = dataclasses.replace(cfg, gist=gcfg)
    session = _session(tiny_llama, hidden_cfg, nets, debug_invariants=True)
    for piece in np.split(_tokens(8, 6 * W + 5), [7, 100, 101, 333]):
        session.feed(piece)
        session.generate(K // 2 + 3)
    session.check()
    tree = session.tree()
    history = tree.tokens().astype(np.int32)
    assert len(history) > 6 * W and tree.counts[2] >= 2
    n, g = tree.counts[1], tree.counts[2]
    feats = layer_hidden(params, config, history[None], layer=2, chunk=64)[0, :n * K]
    lod1 = gist_blocks(nets[0], gcfg, feats.reshape(n, K, -1), 1)
    np.testing.assert_allclose(tree.gists(1), lod1, rtol=1e-5, atol=1e-5)
    lod2 = gist_blocks(nets[0], gcfg, lod1[:g * K].reshape(g, K, -1), 2)
    np.testing.assert_allclose(tree.gists(2), lod2, rtol=1e-5, atol=1e-5)
    wc = session.working_context
    assert session.events[-1].lod_histogram[0][2] > 0  # compressed down to LOD2
    np.testing.assert_array_equal(wc.level[0, :K], 0)  # the sink: the first block, raw
    np.testing.assert_array_equal(wc.node[0, :K], np.arange(K))


def test_a_budget_that_cannot_hold_the_sink_is_refused(tiny_llama, cfg, nets):
    small = dataclasses.replace(cfg, mc=dataclasses.replace(cfg.mc, w_max=48))  # 16+32+16
    with pytest.raises(ConfigError, match="sink_blocks=1 .*need w_max >= 64"):
        Session(tiny_llama, nets[0], nets[1], small)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_op_fuzz_keeps_the_cache_equal_to_a_fresh_prefill_after_every_refocus(
        tiny_llama, cfg, nets, seed):
    """Differential fuzz over the edit paths: random focus (expansions and collapses every
    refocus), random feeds (some streams only, sometimes while pending tokens are in the
    cache), generations of random lengths with and without EOS, syncs between pieces.
    After every refocus (on_event) and every op, the KV cache equals a fresh prefill of
    the materialized WC + pending tokens and the next tokens match (`Session.check`)."""
    rng = np.random.default_rng(seed)
    checked = []
    s = _session(tiny_llama, cfg, nets, batch_size=2, focus_policy="random", focus_seed=seed,
                 debug_invariants=True)
    starts = []

    def on_event(e):
        s.check()
        checked.append(e.trigger)
        # each stream re-prefills its own range: from its first change (K-aligned) through
        # its last valid slot, whatever its neighbour needed
        for b in range(2):
            if e.reprefill_slots[b] and not e.kv_reused[b]:
                first = e.first_changed_slot[b] // K * K
                num_valid = round(e.budget_use[b] * W)
                assert e.reprefill_start[b] == first
                assert e.reprefill_slots[b] == -(-num_valid // K) * K - first
        starts.append(tuple(e.reprefill_start))

    s.on_event = on_event
    s.feed([_tokens(seed, int(rng.integers(K, 6 * K))), _tokens(seed + 7, 9 * K + 5)])
    for _ in range(8):
        op = rng.choice(["feed", "generate", "eos", "sync"])
        if op == "feed":
            n = [int(rng.integers(0, 3 * K)) if rng.random() < 0.7 else 0 for _ in range(2)]
            s.feed([_tokens(int(rng.integers(1 << 20)), x) for x in n])
        elif op == "generate":
            s.generate(int(rng.integers(1, 2 * K + 3)))
        elif op == "eos":
            out = s.generate(3)
            s.generate(int(rng.integers(1, K + 2)), eos_id=int(out[0, -1]))
        else:
            s.sync()
        s.check()
    edits = sum(sum(e.num_expand) + sum(e.num_collapse) for e in s.events)
    assert checked, "no refocus happened"
    assert edits > 0, "the fuzz never exercised an edit path"
    assert any(a != b for a, b in starts), "the streams never re-prefilled different ranges"


def test_forcing_the_generated_tokens_equals_generating_them(tiny_llama, cfg, nets):
    """Session.force puts given tokens through the decode path: forcing what another
    session generated, in uneven pieces, leaves the same WC, cache and next token, and its
    refocuses are decode refocuses that took the same actions."""
    a = _session(tiny_llama, cfg, nets, batch_size=2, focus_policy="random")
    b = _session(tiny_llama, cfg, nets, batch_size=2, focus_policy="random")
    for s in (a, b):
        s.feed(_two_streams())
    out = a.generate(3 * K + 4)
    for lo, hi in ((0, 5), (5, K), (K, 2 * K + 7), (2 * K + 7, 3 * K + 4)):
        b.force(out[:, lo:hi])
    b.check()  # its cache equals a fresh prefill of its WC and pending tokens
    for x, y in zip(jax.tree.leaves(a._state), jax.tree.leaves(b._state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ea, eb = list(a.events), list(b.events)
    assert [e.trigger for e in eb] == [e.trigger for e in ea] == ["input"] + ["decode"] * 3
    assert [e.actions for e in eb] == [e.actions for e in ea]
    for bad in (np.zeros((1, K), np.int64), np.zeros((2, 0), np.int64),
                np.full((2, 3), TINY_LLAMA.vocab_size)):
        with pytest.raises(InputError, match="force"):
            b.force(bad)


def test_decode_focus_on_collapse_acts_only_in_refocuses_that_make_room(tiny_llama, cfg,
                                                                         nets):
    """decode_focus="on_collapse": a refocus of decoded tokens takes focus actions only when
    a budget or headroom collapse is due, and otherwise only appends (its pending KV
    copied, nothing re-prefilled); "every" acts in the refocuses between too. The cache
    stays a fresh prefill of the WC (debug_invariants checks it after every refocus)."""
    def run(decode_focus):
        s = _session(tiny_llama, cfg, nets, batch_size=2, focus_policy="random",
                     decode_focus=decode_focus, debug_invariants=True)
        s.feed([_tokens(3, 5 * K + 3), _tokens(4, 9 * K)])
        s.generate(8 * K)
        s.check()
        return [e for e in s.events if e.trigger == "decode"]

    lazy, eager = run("on_collapse"), run("every")
    made_room = quiet = 0
    for e in lazy:
        for b in range(2):
            room = e.append_collapses[b] + e.headroom_collapses[b]
            acted = e.num_expand[b] + e.num_collapse[b]
            if room:
                made_room += 1
            else:
                quiet += 1
                assert acted == 0, e
                assert e.kv_reused[b] and e.reprefill_slots[b] == 0, e
    assert made_room and quiet, "the run never both made room and only appended"
    assert any(e.num_expand[b] + e.num_collapse[b] > 0 for e in lazy for b in range(2)
               if e.append_collapses[b] + e.headroom_collapses[b])  # focus still acts
    assert any(e.num_expand[b] + e.num_collapse[b] > 0 for e in eager for b in range(2)
               if e.append_collapses[b] + e.headroom_collapses[b] == 0)
    with pytest.raises(ConfigError, match="decode_focus"):
        _session(tiny_llama, cfg, nets, decode_focus="sometimes")


def test_materialized_is_each_streams_wc_over_its_own_tree(tiny_llama, cfg, nets):
    """Session.materialized (the session's batched device view) equals materializing each
    stream's WC over a fresh view of its tree, after the pending input is synced."""
    import jax as _jax

    from mcjax import working_context as wcm

    s = _session(tiny_llama, cfg, nets, batch_size=2)
    s.feed(_two_streams())
    emb, pos, valid = s.materialized()
    wc = s.working_context
    for b in range(2):
        e, p, v = wcm.materialize(_jax.tree.map(lambda x: x[b], wc), s.tree(b).view(),
                                  s._params, cfg.mc)
        np.testing.assert_array_equal(emb[b], e)
        np.testing.assert_array_equal(pos[b], p)
        np.testing.assert_array_equal(valid[b], v)
    assert int(np.asarray(valid).sum()) == int(np.asarray(wc.num_valid).sum()) > 0


def _layer0_reference(s):
    """Layer-0 keys/values [B, W, ...] of a fresh prefill of each stream's materialized WC:
    they depend only on a slot's own input and position, so a moved, re-rotated entry must
    equal them exactly (deeper layers also see the context, which approx reuse keeps)."""
    from mcjax.base import model as base

    emb, pos, valid = s.materialized()
    ref = base.init_cache(TINY_LLAMA, s.batch_size, W + K)
    _, ref = base.prefill(s._params, TINY_LLAMA, ref, embeds=emb, positions=pos, mask=valid,
                          index=0)
    return np.asarray(ref.k[0, :, :W]), np.asarray(ref.v[0, :, :W]), np.asarray(valid)


def test_approx_kv_reuse_moves_and_rerotates_entries_exactly_and_recomputes_fewer_slots(
        tiny_llama, cfg, nets):
    """kv_reuse="approx" under random focus (edits every refocus), fed and decoding: after
    every refocus the cache's layer-0 entries equal a fresh prefill's (moves and RoPE
    re-rotation are exact; only the context of kept entries is approximate); a twin fed the
    same pieces exactly takes the same focus actions while approx recomputes fewer slots;
    the refocus program compiles once."""
    seen = []

    def check_layer0(s):
        k_ref, v_ref, valid = _layer0_reference(s)
        m = valid[:, :, None, None]
        np.testing.assert_allclose(np.where(m, s._state.cache.k[0, :, :W], 0),
                                   np.where(m, k_ref, 0), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.where(m, s._state.cache.v[0, :, :W], 0),
                                   np.where(m, v_ref, 0), atol=2e-5, rtol=1e-4)

    def session(mode):
        return _session(tiny_llama, cfg, nets, batch_size=2, focus_policy="random",
                        focus_seed=3, kv_reuse=mode, debug_invariants=True)

    s = session("approx")
    s.on_event = lambda e: (check_layer0(s), seen.append(any(e.reprefill_approximate)))
    s.feed([_tokens(11, 7 * K + 3), _tokens(12, 4 * K)])
    s.generate(2 * K + 1)
    for i in range(3):
        s.feed([_tokens(20 + i, 2 * K + i), _tokens(30 + i, K)])
        s.generate(K + 2)
    assert s.compiled_programs()["refocus"] == 1  # one refocus program for both paths
    assert any(seen), "no refocus took the approximate path"
    s.check()  # invariants and validity (the cache is approximate by design)

    exact, approx = session("exact"), session("approx")
    for t in (exact, approx):
        t.feed([_tokens(13, 9 * K), _tokens(14, 5 * K)])
    pieces = [(_tokens(40 + i, 5 + i), _tokens(50 + i, 3 + 2 * i)) for i in range(8)]
    for p in pieces:
        for t in (exact, approx):
            t.feed(list(p))
            t.sync()
    ev_e, ev_a = list(exact.events), list(approx.events)
    assert [e.actions for e in ev_e] == [e.actions for e in ev_a]
    np.testing.assert_array_equal(exact.working_context.node, approx.working_context.node)
    pairs = [(a, e, b) for a, e in zip(ev_a, ev_e) for b in range(2)]
    used = [(a.reprefill_slots[b], e.reprefill_slots[b]) for a, e, b in pairs
            if a.reprefill_approximate[b]]
    assert used and all(a < e for a, e in used)
    assert all(a.reprefill_slots[b] == e.reprefill_slots[b] for a, e, b in pairs
               if not a.reprefill_approximate[b])


def test_cache_logprobs_equal_a_fresh_forward_and_leave_the_session_unchanged(
        tiny_llama, cfg, nets):
    from mcjax.base import model as base

    s, twin = (_session(tiny_llama, cfg, nets, batch_size=2) for _ in range(2))
    for t in (s, twin):
        t.feed(_two_streams())
    cont = np.stack([_tokens(60, K), _tokens(61, K)])
    got = s.cache_logprobs(cont)
    emb, pos, valid = s.materialized()
    wc = s.working_context
    first = np.asarray(wc.num_valid if cfg.mc.position_scheme == "compact" else wc.num_tokens)
    # independent reference: one plain forward over [materialized WC ‖ continuation];
    # continuation token i is predicted from continuation slot i - 1
    params, W = s._params, valid.shape[1]
    hidden = base.forward_core(
        params, TINY_LLAMA, None,
        jnp.concatenate([emb, base.embed_tokens(params, jnp.asarray(cont)).astype(emb.dtype)], 1),
        jnp.concatenate([pos, first[:, None] + np.arange(K)[None]], 1).astype(jnp.int32),
        jnp.concatenate([valid, np.ones(cont.shape, bool)], 1), return_hidden=True)
    logp = jax.nn.log_softmax(base.logits_from_hidden(
        params, TINY_LLAMA, hidden[:, W:W + K - 1]).astype(jnp.float32), -1)
    want = np.take_along_axis(np.asarray(logp), cont[:, 1:, None], -1)[..., 0]
    assert got.shape == (2, K - 1)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(s.generate(K + 3), twin.generate(K + 3))
    with pytest.raises(InputError, match="pending"):
        s.cache_logprobs(cont)
    with pytest.raises(InputError, match="2 <= T"):
        twin.cache_logprobs(cont[:, :1])


def _ops(s, seed):
    """A fixed mix of feeds and generations (the continuation a loaded session must
    repeat)."""
    outs = [s.generate(2 * K + 3)]
    s.feed([_tokens(seed, 2 * K + 1), _tokens(seed + 1, 5)])
    outs.append(s.generate(K + 4))
    return np.concatenate(outs, 1)


@pytest.mark.parametrize("policy", ["random", "retrieval"])
def test_a_saved_session_loads_and_continues_bit_identically(tiny_llama, cfg, nets, tmp_path,
                                                             policy):
    s = _session(tiny_llama, cfg, nets, batch_size=2, focus_policy=policy, focus_seed=5)
    s.feed(_two_streams())
    s.generate(K + 5)  # a refocus, then 5 pending tokens in the cache
    first = s.save(tmp_path / "run")
    s.feed([_tokens(70, 3), np.zeros(0, np.int64)])  # unsynced input in the trees, too
    published = s.save(tmp_path / "run")
    assert published != first and not first.exists()  # the older save is gone
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".save.lock", "LATEST", published.name]  # the writers' lock file stays

    loaded = Session.load(tmp_path / "run", tiny_llama, debug_invariants=True)
    assert loaded.num_tokens.tolist() == s.num_tokens.tolist()
    for b in range(2):
        np.testing.assert_array_equal(loaded.tree(b).tokens(), s.tree(b).tokens())
        for level in range(1, cfg.mc.num_levels + 1):
            np.testing.assert_array_equal(loaded.tree(b).gists(level), s.tree(b).gists(level))
        if policy == "retrieval":
            np.testing.assert_array_equal(loaded.tree(b).keys(), s.tree(b).keys())
    want = _ops(s, 80)
    got = _ops(loaded, 80)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.working_context.node, s.working_context.node)
    np.testing.assert_array_equal(loaded.working_context.level, s.working_context.level)
    loaded.check()  # its cache equals a fresh prefill of its WC (an independent reference)
    assert loaded.provenance["focus_policy"] == s.provenance["focus_policy"]


def test_loading_what_is_not_a_saved_session_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(CheckpointError, match="no saved session"):
        Session.load(tmp_path, tiny_llama)
    (tmp_path / "LATEST").write_text("save-1")
    (tmp_path / "save-1").mkdir()
    (tmp_path / "save-1" / "session.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a session save"):
        Session.load(tmp_path, tiny_llama)


_SAVER = """
import dataclasses, os, signal, sys
import numpy as np, jax
from mcjax.base.model import init_params
from mcjax.config import TINY_LLAMA, get_config
from mcjax.runtime import Session, untrained_params
cfg = dataclasses.replace(get_config("tiny", {overrides!r}), base_config=TINY_LLAMA)
llama = (TINY_LLAMA, init_params(TINY_LLAMA, jax.random.key(7)))
s = Session(llama, untrained_params(cfg, "gist"), untrained_params(cfg, "lens"), cfg,
            max_tokens={max_tokens}, collapse_headroom={headroom}, focus_policy="random")
s.feed(np.random.default_rng(0).integers(3, TINY_LLAMA.vocab_size, 300))
stage, done = sys.argv[2], [0]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
def hook(name, original, when):
    def wrapped(*args, **kwargs):
        if done[0] == 2 and when(*args):  # the third save is killed here
            die()
        return original(*args, **kwargs)
    return wrapped
if stage == "arrays":  # half-way: trees written, arrays not
    np.savez = hook("savez", np.savez, lambda *a: True)
else:  # everything written and renamed, the LATEST pointer not yet replaced
    os.replace = hook("replace", os.replace, lambda src, dst: str(dst).endswith("LATEST"))
while True:
    s.generate(5)
    s.save(sys.argv[1])
    done[0] += 1
    print(int(s.num_tokens[0]), flush=True)
"""


@pytest.mark.parametrize("stage", ["arrays", "publish"])
def test_a_session_killed_while_saving_leaves_the_previous_save_loadable(tiny_llama, tmp_path,
                                                                         stage):
    """SIGKILL inside the third save — while writing its arrays, or after everything but
    the publication — leaves the second save loadable and consistent; the next save
    removes the leftovers."""
    import subprocess
    import sys

    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(overrides=OVERRIDES, max_tokens=MAX_TOKENS,
                                    headroom=HEADROOM))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), str(run), stage], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    saved = [int(x) for x in done.stdout.split()]
    assert len(saved) == 2
    assert len(list(run.glob("save-*")) + list(run.glob(".incomplete-save-*"))) == 2  # torn
    loaded = Session.load(run, tiny_llama)
    assert int(loaded.num_tokens[0]) == saved[-1]
    loaded.check()  # consistent: the cache equals a fresh prefill of the loaded WC
    loaded.generate(K)
    final = loaded.save(run)
    assert sorted(p.name for p in run.iterdir()) == [".save.lock", "LATEST", final.name]


def test_the_pure_programs_driven_from_a_plain_loop_equal_a_session(tiny_llama, cfg, nets):
    """Everything a session does is the public pure programs over `StreamState` + the tree
    view: a hand-written loop (feed, first layout, K-token decode blocks each followed by a
    refocus of the decoded tokens, more input, decode again) gives the session's tokens, WC
    and cache bit for bit."""
    from mcjax import runtime as rt
    from mcjax.tree import BlockGister, MegaContextTree

    llama, params = tiny_llama
    B, L = 2, cfg.mc.num_levels
    first = [_tokens(11, 5 * K + 3), _tokens(12, 9 * K)]
    second = [_tokens(13, 2 * K + 5), _tokens(14, 7)]
    session = _session(tiny_llama, cfg, nets, batch_size=B)
    session.feed(first)
    want = [session.generate(3 * K)]
    session.feed(second)
    want.append(session.generate(2 * K))

    plan = rt.make_plan(llama, cfg, batch_size=B, max_tokens=MAX_TOKENS,
                        collapse_headroom=HEADROOM, prefill_chunk=2 * K)
    assert not plan.query_aware and plan.settle_rounds == 0
    assert plan == session._plan
    jitted = rt.programs(plan)
    gister = BlockGister.from_base(cfg.gist, nets[0], params, llama, block_size=K)
    trees = [MegaContextTree.in_memory(cfg.mc, gister, view_capacity_tokens=MAX_TOKENS)
             for _ in range(B)]
    state, view = jax.device_put(rt.initial_state(plan)), jax.device_put(rt.empty_view(plan))
    synced = np.zeros((B, L + 1), np.int64)
    no = np.zeros(B, bool)
    empty_layout = jax.device_put(rt.initial_layouts(plan, [0] * B, no))

    def refocus(state, view, synced, num_new, reset, layout, revive, from_pending):
        update = rt.view_update(trees, synced)
        if update is not None:
            view, synced = jitted.write_view(view, *update), update[4]
        state, telemetry = jitted.refocus(params, nets[1], state, view,
                                          np.asarray(num_new, np.int32), reset, layout,
                                          revive, np.bool_(from_pending))
        assert not np.asarray(telemetry["append_overflow"]).any()
        return state, view, synced

    def generate(state, view, synced, n):
        out = []
        state = state.replace(done=jnp.zeros_like(state.done))
        for _ in range(n // K):
            state, tokens, ran = jitted.decode(params, state, np.int32(K - 3), np.int32(-1))
            assert int(ran) == K - 3
            # a block asking for more steps than pending slots are left stops at K
            state, more, ran = jitted.decode(params, state, np.int32(K + 5), np.int32(-1))
            assert int(ran) == 3
            tokens = np.concatenate([np.asarray(tokens)[:, :K - 3], np.asarray(more)[:, :3]], 1)
            out.append(np.asarray(tokens))
            for tree, t in zip(trees, out[-1]):
                tree.append(t)
            state, view, synced = refocus(state, view, synced, [K] * B, no, empty_layout,
                                          no, True)
        return state, view, synced, np.concatenate(out, 1)

    for tree, x in zip(trees, first):
        tree.append(x)
    reset = np.ones(B, bool)
    state, view, synced = refocus(state, view, synced, [0] * B, reset, jax.device_put(
        rt.initial_layouts(plan, [t.num_tokens for t in trees], reset)), reset, False)
    state, view, synced, got = generate(state, view, synced, 3 * K)
    np.testing.assert_array_equal(got, want[0])
    for tree, x in zip(trees, second):
        tree.append(x)
    num_new = np.asarray([len(x) for x in second])
    state, view, synced = refocus(state, view, synced, num_new, no, empty_layout, num_new > 0,
                                  False)
    state, view, synced, got = generate(state, view, synced, 2 * K)
    np.testing.assert_array_equal(got, want[1])

    assert plan == session._plan  # the same compiled programs
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
                 jax.device_get(session._state))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(view),
                 jax.device_get(session._view))


# ---------------------------------------------------------------- saves: exclusive, atomic,
# verified (issue 33)


def _saved(tiny_llama, cfg, nets, run, seed=3):
    s = _session(tiny_llama, cfg, nets, focus_policy="random")
    s.feed(_tokens(seed, 2 * K + 7))
    s.generate(5)
    return s, s.save(run)


def test_a_save_removes_only_the_entries_saves_made(tiny_llama, cfg, nets, tmp_path):
    run = tmp_path / "run"
    (run / "save-notes").mkdir(parents=True)
    (run / "save-notes" / "todo.txt").write_text("mine")
    (run / "save-7").mkdir()  # a hand-made folder with a save's name, no save marker
    (run / "save-7" / "x.txt").write_text("mine too")
    (run / "save-draft.txt").write_text("and this")
    (run / ".incomplete-save-2").mkdir()
    s, first = _saved(tiny_llama, cfg, nets, run)
    assert first.name == "save-8"
    second = s.save(run)
    assert not first.exists() and second.name == "save-9"
    assert (run / "save-notes" / "todo.txt").read_text() == "mine"
    assert (run / "save-7" / "x.txt").read_text() == "mine too"
    assert (run / "save-draft.txt").read_text() == "and this"
    assert (run / ".incomplete-save-2").is_dir()
    assert Session.load(run, tiny_llama).num_tokens.tolist() == s.num_tokens.tolist()


def test_a_second_writer_is_refused_at_once_naming_the_holder(tiny_llama, cfg, nets, tmp_path):
    import os
    import time

    from mcjax.runtime.persist import SaveLockedError, save_lock

    run = tmp_path / "run"
    s, first = _saved(tiny_llama, cfg, nets, run)
    with save_lock(run):  # another writer (its own open file: flock is per open file)
        t0 = time.perf_counter()
        with pytest.raises(SaveLockedError, match=f"pid {os.getpid()}"):
            s.save(run)
        assert time.perf_counter() - t0 < 1.0
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "LATEST", first.name]  # nothing written by the refused save
    assert s.save(run).name == "save-2"  # the lock went with its holder


def test_latest_may_only_name_a_save_inside_the_directory(tiny_llama, cfg, nets, tmp_path):
    from mcjax.runtime.persist import SaveDamagedError

    run = tmp_path / "run"
    _saved(tiny_llama, cfg, nets, run)
    for pointer in ("../run/save-1", "/tmp", "save-1/..", "save-notes", "save-2", ""):
        (run / "LATEST").write_text(pointer)
        with pytest.raises(SaveDamagedError, match="LATEST"):
            Session.load(run, tiny_llama)
    (run / "LATEST").write_text("save-1\n")
    Session.load(run, tiny_llama)
    file = tmp_path / "a-file"
    file.write_text("x")
    s = _session(tiny_llama, cfg, nets)
    s.feed(_tokens(1, 20))
    with pytest.raises(CheckpointError, match="cannot save into"):
        s.save(file)
    with pytest.raises(CheckpointError, match="not a directory"):
        Session.load(file, tiny_llama)


def test_a_damaged_or_incomplete_save_is_a_clear_error(tiny_llama, cfg, nets, tmp_path):
    import json

    from mcjax.runtime import persist

    run = tmp_path / "run"
    _, where = _saved(tiny_llama, cfg, nets, run)
    meta = json.loads((where / "session.json").read_text())
    del meta["host"]  # a key missing (the checksums rewritten: only the content is wrong)
    (where / "session.json").write_text(json.dumps(meta))
    persist.write_checksums(where)
    with pytest.raises(persist.SaveDamagedError, match="KeyError"):
        Session.load(run, tiny_llama)
    (where / "arrays.npz").write_bytes(b"PK\x03\x04 not a zip")
    persist.write_checksums(where)
    with pytest.raises(persist.SaveDamagedError, match="arrays.npz: unreadable"):
        Session.load(run, tiny_llama)
    (where / "arrays.npz").unlink()
    with pytest.raises(persist.SaveDamagedError, match="arrays.npz is missing"):
        Session.load(run, tiny_llama)
    meta["format_version"] = 99
    (where / "session.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a session save"):
        Session.load(run, tiny_llama)


def test_a_save_with_token_ids_outside_the_vocabulary_is_refused(tiny_llama, cfg, nets,
                                                                 tmp_path):
    """Consistent checksums prove the bytes are those written, not that they make sense:
    a token id past the vocabulary (here rewritten with fresh checksums) is refused."""
    from mcjax.runtime import persist
    from mcjax.tree import HEADER_SIZE

    run = tmp_path / "run"
    _, where = _saved(tiny_llama, cfg, nets, run)
    lod0 = where / "tree-0" / "LOD0.ctx"
    data = bytearray(lod0.read_bytes())
    data[HEADER_SIZE + 4 * 3:HEADER_SIZE + 4 * 4] = np.uint32(70_000).tobytes()
    lod0.write_bytes(bytes(data))
    persist.write_checksums(where)
    with pytest.raises(CheckpointError, match="token id 70000 is outside"):
        Session.load(run, tiny_llama)


def test_load_refuses_a_base_model_with_other_weights(tiny_llama, cfg, nets, tmp_path):
    from mcjax.base.model import init_params
    from mcjax.runtime.persist import BaseModelMismatchError

    run = tmp_path / "run"
    _saved(tiny_llama, cfg, nets, run)
    other = (TINY_LLAMA, init_params(TINY_LLAMA, jax.random.key(8)))  # same shapes
    with pytest.raises(BaseModelMismatchError, match="other weights"):
        Session.load(run, other)
    one_weight = jax.tree.map(lambda x: x, tiny_llama[1])
    leaf = jax.tree_util.tree_leaves(one_weight)[-1]
    flat = np.asarray(leaf).copy().reshape(-1)
    flat[123] = np.nextafter(flat[123], np.inf)  # one ulp of one weight
    one_weight = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(one_weight),
        jax.tree_util.tree_leaves(one_weight)[:-1] + [flat.reshape(leaf.shape)])
    with pytest.raises(BaseModelMismatchError):
        Session.load(run, (TINY_LLAMA, one_weight))


def test_random_byte_flips_in_a_save_are_detected_or_harmless(tiny_llama, cfg, nets, tmp_path):
    """Every flip of one byte anywhere in a save directory (the save's files, LATEST, the
    lock file) makes `load` raise a `CheckpointError` naming the damage, or loads a
    session identical to the undamaged one (a flip in a lock file: informational only)."""
    from mcjax.runtime import persist

    run = tmp_path / "run"
    s, where = _saved(tiny_llama, cfg, nets, run)
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.stat().st_size)
    rng = np.random.default_rng(0)
    detected, harmless, kinds = 0, 0, collections.Counter()
    want_tokens = s.tree().tokens()
    flips = 60
    for i in range(flips):
        # every file once, then files drawn by size (the big ones hold most bytes)
        path = files[i] if i < len(files) else files[rng.choice(
            len(files), p=np.asarray([f.stat().st_size for f in files], float)
            / sum(f.stat().st_size for f in files))]
        data = bytearray(path.read_bytes())
        at = int(rng.integers(len(data)))
        original = data[at]
        data[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        try:
            loaded = Session.load(run, tiny_llama)
        except CheckpointError as e:
            detected += 1
            kinds[type(e).__name__] += 1
        else:
            harmless += 1
            assert path.name == persist.SAVE_LOCK, (path, at)
            np.testing.assert_array_equal(loaded.tree().tokens(), want_tokens)
        finally:
            data[at] = original
            path.write_bytes(bytes(data))
    assert detected + harmless == flips and detected > 0
    print(f"save byte flips: {flips} tried, {detected} detected {dict(kinds)}, "
          f"{harmless} harmless")
    Session.load(run, tiny_llama)  # restored: loads again


_CONCURRENT = """
import dataclasses, json, sys, time
import numpy as np, jax
from mcjax.base.model import init_params
from mcjax.checkpoint import CheckpointError
from mcjax.config import TINY_LLAMA, get_config
from mcjax.runtime import Session, untrained_params
cfg = dataclasses.replace(get_config("tiny", {overrides!r}), base_config=TINY_LLAMA)
llama = (TINY_LLAMA, init_params(TINY_LLAMA, jax.random.key(7)))
run, me, go, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
histories = []
for seed in (0, 1):
    s = Session(llama, untrained_params(cfg, "gist"), untrained_params(cfg, "lens"), cfg,
                max_tokens={max_tokens}, collapse_headroom={headroom}, focus_policy="random")
    s.feed(np.random.default_rng(seed).integers(3, TINY_LLAMA.vocab_size, 40 + 20 * seed))
    histories.append(s.tree().tokens())
    if seed == me:
        session = s
# warm up (compiles) with one save and load elsewhere before the clock starts
session.save(run + "-warm-" + str(me))
Session.load(run + "-warm-" + str(me), llama)
counts = dict(saves=0, loads=0, errors={{}}, lost=0)
while time.time() < go:
    time.sleep(0.005)
end = time.time() + seconds
while time.time() < end:
    for what in ("save", "load"):
        try:
            if what == "save":
                session.save(run)
                counts["saves"] += 1
            else:
                got = Session.load(run, llama).tree().tokens()
                counts["loads"] += 1
                if not any(len(got) == len(h) and (got == h).all() for h in histories):
                    counts["lost"] += 1
        except CheckpointError as e:
            counts["errors"][type(e).__name__] = counts["errors"].get(type(e).__name__, 0) + 1
            counts.setdefault("first", {{}}).setdefault(type(e).__name__, str(e)[:300])
        except Exception as e:  # anything not our own clear error fails the test
            counts["errors"]["RAW " + type(e).__name__ + ": " + str(e)[:200]] = 1
print(json.dumps(counts), flush=True)
"""


def test_two_processes_saving_and_loading_one_directory_lose_nothing(tiny_llama, cfg,
                                                                     tmp_path):
    """Two processes save into and load from one directory in a loop for 3 s: every load
    returns one of the two sessions whole, every failure is our own clear error (a save
    refused while the other writes), and the directory ends loadable."""
    import json
    import subprocess
    import sys
    import time

    from mcjax.runtime import persist

    script = tmp_path / "both.py"
    script.write_text(_CONCURRENT.format(overrides=OVERRIDES, max_tokens=MAX_TOKENS,
                                         headroom=HEADROOM))
    run = tmp_path / "run"
    first = Session(tiny_llama, untrained_params(cfg, "gist"), untrained_params(cfg, "lens"),
                    cfg, max_tokens=MAX_TOKENS, collapse_headroom=HEADROOM,
                    focus_policy="random")  # process 0's session: a save to start from
    first.feed(np.random.default_rng(0).integers(3, TINY_LLAMA.vocab_size, 40))
    first.save(run)
    go = time.time() + 60  # both start together once warmed up (compiles, first save)
    procs = [subprocess.Popen([sys.executable, str(script), str(run), str(me), str(go), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    print("concurrent saves/loads:", results)
    for r in results:
        print(r.pop("first", None))
        assert r["lost"] == 0
        assert all(not k.startswith("RAW") for k in r["errors"]), r["errors"]
        assert set(r["errors"]) <= {"SaveLockedError"}, r["errors"]
        assert r["saves"] > 0 and r["loads"] > 0
    Session.load(run, tiny_llama)
    left = [p.name for p in run.iterdir() if persist.is_save_name(p.name)]
    final = first.save(run)  # no load reads now: every older save is removed
    assert [p.name for p in run.iterdir() if persist.is_save_name(p.name)] == [final.name]
    print(f"saves left by the race: {len(left)}")


def test_a_stream_interrupted_by_feed_raises_instead_of_ending_silently(tiny_llama, cfg, nets):
    s = _session(tiny_llama, cfg, nets)
    s.feed(_tokens(5, 40))
    it = s.stream(40)
    first = next(it)
    assert first.shape == (1, K)
    s.feed(_tokens(6, 7))
    with pytest.raises(InputError, match="stream\\(\\) was ended after 16 of 40 tokens"):
        list(it)
    assert s.num_tokens.tolist() == [40 + K + 7]  # the yielded tokens are in the history
    it = s.stream(20)
    next(it)
    s.generate(3)  # another generation ends it too
    with pytest.raises(InputError, match="was ended"):
        next(it)
    assert s.generate(K + 1).shape == (1, K + 1)  # a new stream works


def test_counts_and_ids_are_refused_not_truncated(tiny_llama, cfg, nets):
    s = _session(tiny_llama, cfg, nets)
    s.feed(_tokens(5, 40))
    for bad in (2.9, "3", 3.0, True, None):
        with pytest.raises(InputError, match="max_new_tokens must be an integer"):
            s.generate(bad)
    for bad in (128.5, 2 ** 40, -1, TINY_LLAMA.vocab_size):
        with pytest.raises(InputError, match="eos_id"):
            s.generate(4, eos_id=bad)
    assert s.generate(np.int64(2), eos_id=np.int32(5)).shape[1] <= 2
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        _session(tiny_llama, cfg, nets, batch_size=1.5)
    with pytest.raises(ConfigError, match="max_tokens must be an integer"):
        _session(tiny_llama, cfg, nets, max_tokens=4096.7)
    with pytest.raises(ConfigError, match="focus_seed must be an integer"):
        _session(tiny_llama, cfg, nets, focus_seed=1.5)
    with pytest.raises(ConfigError, match="max_events"):
        _session(tiny_llama, cfg, nets, max_events=0)


def test_make_plan_checks_every_program_setting_before_any_work(tiny_llama, cfg):
    """One constructor checks the plan: each bad setting is refused by `make_plan`, and a
    Session with it raises the same error before it resolves or checks any network (its
    nets here are not params at all)."""
    from mcjax.config import override
    from mcjax.runtime import make_plan

    llama, _ = tiny_llama
    layers = llama.num_layers
    lens_v2 = {"lens.query_tokens": 3, "lens.query_layer": 2, "lens.retrieval_features": True}
    other_base = dataclasses.replace(cfg, base_config=dataclasses.replace(
        llama, vocab_size=llama.vocab_size + 1))
    bad = [
        (other_base, {}, "different base model"),
        (override(cfg, {"retrieval.layers": (1, layers)}), {"focus_policy": "retrieval"},
         "retrieval.layers"),
        (override(cfg, {**lens_v2, "lens.query_layer": layers + 1}), {}, "query_layer"),
        (cfg, {"focus_policy": "oracle"}, "focus_policy"),
        (cfg, {"kv_reuse": "fast"}, "kv_reuse"),
        (cfg, {"prefill_chunk": K + K // 2}, "prefill_chunk"),
        (cfg, {"collapse_headroom": -K}, "collapse_headroom"),
        (cfg, {"pad_id": llama.vocab_size}, "pad_id"),
        (cfg, {"max_tokens": W - 1}, "max_tokens"),
    ]
    for bad_cfg, kwargs, what in bad:
        with pytest.raises(ConfigError, match=what):
            make_plan(llama, bad_cfg, **kwargs)
        with pytest.raises(ConfigError, match=what):
            Session(tiny_llama, {"not": "params"}, {"not": "params"}, bad_cfg, **kwargs)
    with pytest.raises(TypeError, match="ExperimentConfig"):
        make_plan(llama, "tiny")
    with pytest.raises(TypeError, match="LlamaConfig"):
        Session(({"not": "a config"}, tiny_llama[1]), None, None, cfg)
    # the base model may be served in another precision
    other_dtype = dataclasses.replace(cfg, base_config=dataclasses.replace(
        llama, dtype="bfloat16" if llama.dtype != "bfloat16" else "float32"))
    assert make_plan(llama, other_dtype) == make_plan(llama, cfg)


def test_ragged_input_is_a_clear_error(tiny_llama, cfg, nets):
    """`feed([5, [6, 7]])` on two streams raised numpy's ValueError from deep inside."""
    s = _session(tiny_llama, cfg, nets, batch_size=2)
    for bad in ([5, [6, 7]], [[6, 7], 5], [5, "text"]):
        with pytest.raises(InputError, match="mix"):
            s.feed(bad)
    s.feed([[6, 7], [8]])  # one sequence per stream
    assert s.num_tokens.tolist() == [2, 1]
