"""MegaContext tree (SPEC §2.3): streaming append, hierarchical gisting, device view, and
the durable on-disk format (reopen, torn tails, SIGKILLed writers, corrupt files)."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mcjax.tree.read_pass as read_pass
import mcjax.tree.store as store_format
from mcjax.base.model import embed_tokens, init_params
from mcjax.config import MCConfig, get_config
from mcjax.gist import gist_blocks, init_gist_params
from mcjax.tree import (
    HEADER_SIZE, MAGIC, BadMagicError, BlockGister, BlockSizeMismatchError, CorruptHeaderError,
    DtypeMismatchError, EmbeddingDimMismatchError, HeaderChecksumError,
    InconsistentLevelsError, LevelMismatchError, LostEntriesError, MegaContextTree,
    MetadataChecksumError, MetadataError, MissingStoreFileError, ModelMismatchError,
    RowChecksumError, StoreError, StoreExistsError, StoreLockedError, TokenRangeError,
    TreeCapacityError, TreeInputError, TreeView, TruncatedFileError, UnsupportedVersionError,
    append_to_trees, copy_rows, level_filename, read_header, view_update, write_view)

CFG = get_config("tiny")
MC = CFG.mc  # K = 32, num_levels = 2
K = MC.block_size
D = CFG.base_config.hidden_size
VOCAB = CFG.base_config.vocab_size
MODEL = "tiny-llama"
CHUNK_SIZES = (1, 7, 31, 32, 33, 1000)
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def base_params():
    return init_params(CFG.base_config, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def gist_params():
    return init_gist_params(CFG.gist, D, jax.random.PRNGKey(1))


@functools.lru_cache(maxsize=None)
def make_gister(gist_batch: int = 16, block_size: int = K) -> BlockGister:
    return BlockGister.from_base(CFG.gist, gist_params(), base_params(), CFG.base_config,
                                 block_size=block_size, gist_batch=gist_batch)


@functools.lru_cache(maxsize=None)
def stream(n: int = 3 * 1024 + 37, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, VOCAB, n)
    ids[:2] = (0, VOCAB - 1)  # the extremes of the vocabulary are valid ids
    ids.setflags(write=False)
    return ids


def memory_tree(tokens, mc: MCConfig = MC, gister: BlockGister | None = None):
    t = MegaContextTree.in_memory(mc, gister or make_gister(block_size=mc.block_size))
    t.append(tokens)
    return t


@functools.lru_cache(maxsize=None)
def reference(n: int, seed: int = 0) -> MegaContextTree:
    """In-memory tree of stream(seed)[:n], appended at once (cached; never mutate)."""
    return memory_tree(stream(seed=seed)[:n])


def append_in_chunks(t: MegaContextTree, tokens: np.ndarray, sizes) -> None:
    i, j = 0, 0
    while i < len(tokens):
        n = sizes[j % len(sizes)]
        t.append(tokens[i:i + n])
        i, j = i + n, j + 1


def assert_trees_identical(a: MegaContextTree, b: MegaContextTree) -> None:
    """Same counts, same token ids, bit-identical gists at every level."""
    assert a.counts == b.counts
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    for level in range(1, a.num_levels + 1):
        ga, gb = a.gists(level), b.gists(level)
        assert ga.dtype == gb.dtype
        assert ga.tobytes() == gb.tobytes(), f"LOD{level} gists differ"


def assert_tree_invariants(t: MegaContextTree, tokens: np.ndarray) -> None:
    """Counts follow the stream length; no zero, non-finite or duplicate gist rows; each
    block was gisted exactly once; the ingest buffer is the incomplete newest block."""
    T = len(tokens)
    bs = t.mc.block_size
    assert t.counts == tuple(T // bs**l for l in range(t.num_levels + 1))
    np.testing.assert_array_equal(t.tokens(), tokens)
    for level in range(1, t.num_levels + 1):
        g = t.gists(level).astype(np.float32)
        assert np.all(np.isfinite(g))
        assert np.all(np.abs(g).max(axis=-1) > 0), f"LOD{level} has all-zero rows"
        if len(g) > 1:  # distinct blocks -> distinct gists (no stale or repeated rows)
            assert len(np.unique(g, axis=0)) == len(g)
        assert t.stats.blocks_gisted[level] == t.counts[level]  # each block exactly once
    np.testing.assert_array_equal(t.ingest_buffer, tokens[(T // bs) * bs:])


def chunks_strategy():
    return st.lists(st.one_of(st.sampled_from(CHUNK_SIZES), st.integers(1, 2100)),
                    min_size=1, max_size=12)


# --------------------------------------------------------------------------- appending


@settings(max_examples=40)
@given(n=st.integers(0, 3 * 1024 + 37), sizes=chunks_strategy())
def test_chunked_appends_equal_one_append_bit_for_bit(n, sizes):
    tokens = stream()[:n]
    chunked = MegaContextTree.in_memory(MC, make_gister())
    append_in_chunks(chunked, tokens, sizes)
    at_once = memory_tree(tokens)
    assert_trees_identical(chunked, at_once)
    assert_tree_invariants(chunked, tokens)
    # And a longer stream's tree starts with exactly this tree (prefix stability).
    full = reference(len(stream()))
    for level in range(1, MC.num_levels + 1):
        assert full.gists(level)[:chunked.counts[level]].tobytes() == \
            chunked.gists(level).tobytes()


@settings(max_examples=20)
@given(n=st.integers(0, 700), sizes=chunks_strategy())
def test_tree_is_generic_in_num_levels_and_block_size(n, sizes):
    """block_size 5, three levels: LOD3 nodes appear every 125 tokens."""
    mc = dataclasses.replace(MC, block_size=5, num_levels=3, recent_protect=10)
    g = make_gister(gist_batch=3, block_size=5)
    tokens = stream()[:n]
    chunked = MegaContextTree.in_memory(mc, g)
    append_in_chunks(chunked, tokens, sizes)
    assert_trees_identical(chunked, memory_tree(tokens, mc, g))
    assert_tree_invariants(chunked, tokens)


def test_lod2_node_appears_exactly_when_its_32nd_lod1_child_completes():
    tokens = stream()
    t = MegaContextTree.in_memory(MC, make_gister())
    r = t.append(tokens[:1023])
    assert t.counts == (1023, 31, 0) and r.new_nodes == ((0, 1023), (0, 31), (0, 0))
    r = t.append(tokens[1023:1024])
    assert t.counts == (1024, 32, 1) and r.new_nodes == ((1023, 1024), (31, 32), (0, 1))
    assert r.num_tokens == 1024
    assert t.ingest_buffer.size == 0
    r = t.append(tokens[1024:1030])
    assert r.new_nodes == ((1024, 1030), (32, 32), (1, 1))
    np.testing.assert_array_equal(t.ingest_buffer, tokens[1024:1030])


def test_gisting_through_the_tree_equals_the_pure_gist_function():
    t = reference(len(stream()))
    g = make_gister()
    n1, n2 = t.counts[1], t.counts[2]
    blocks = stream()[:n1 * K].reshape(n1, K)
    emb = embed_tokens(base_params(), jnp.asarray(blocks, jnp.int32))
    lod1 = np.asarray(gist_blocks(gist_params(), CFG.gist, emb, 1))
    chex.assert_trees_all_close(t.gists(1), lod1, atol=1e-5, rtol=1e-5)
    # LOD2 gists the *stored* LOD1 rows, as the tree does.
    lod2 = np.asarray(gist_blocks(gist_params(), CFG.gist,
                                  t.gists(1)[:n2 * K].reshape(n2, K, D), 2))
    chex.assert_trees_all_close(t.gists(2), lod2, atol=1e-5, rtol=1e-5)
    # Called with the tree's own batch shape, the pure function matches bit for bit.
    G = g.gist_batch
    same_shape = np.asarray(gist_blocks(gist_params(), CFG.gist, emb[:G], 1))
    assert same_shape.tobytes() == t.gists(1)[:G].tobytes()


def test_every_gist_call_uses_one_fixed_batch_shape(monkeypatch):
    seen = []
    real = read_pass.gist_blocks

    def spy(params, cfg, children, level):
        seen.append((tuple(children.shape), int(level)))
        return real(params, cfg, children, level)

    monkeypatch.setattr(read_pass, "gist_blocks", spy)
    g = make_gister(gist_batch=5)
    t = MegaContextTree.in_memory(MC, g)
    append_in_chunks(t, stream()[:2200], (1, 33, 700, 7, 1000))
    assert {s for s, _ in seen} == {(5, K, D)}
    assert {lv for _, lv in seen} == {1, 2}
    assert t.stats.gist_calls == len(seen)
    assert_tree_invariants(t, stream()[:2200])


@pytest.mark.parametrize("hidden", [False, True])
def test_trees_appended_together_share_gist_calls_and_equal_trees_appended_alone(hidden):
    """`append_to_trees` (a session's streams) gists all trees' new blocks of a level in
    shared fixed-batch calls: each tree ends bit-identical to one fed alone, and three
    streams completing one block each cost one call, not three."""
    fresh = (lambda: BlockGister.from_base(hidden_gist_cfg(64), gist_params(), base_params(),
                                           CFG.base_config, block_size=K, gist_batch=4)) \
        if hidden else (lambda: BlockGister.from_base(CFG.gist, gist_params(), base_params(),
                                                      CFG.base_config, block_size=K,
                                                      gist_batch=4))
    shared, alone_gister = fresh(), fresh()
    together = [MegaContextTree.in_memory(MC, shared) for _ in range(3)]
    alone = [MegaContextTree.in_memory(MC, alone_gister) for _ in range(3)]
    rng = np.random.default_rng(3)
    feeds = [[rng.integers(0, VOCAB, n) for n in sizes] for sizes in
             ((70, 0, 129), (1, 33, 0), (0, 0, 5), (200, 1, 64), (1000, 37, 1100))]
    for feed in feeds:
        results = append_to_trees(together, feed)
        for tree, x, r in zip(alone, feed, results):
            assert r == tree.append(x)  # the same AppendResult too
    for a, b in zip(together, alone):
        assert_trees_identical(a, b)
    assert [t.counts[2] for t in together] == [1, 0, 1]  # LOD2 through the shared path too
    # streaming: each stream completes one block per round -> one call for all three
    for i in range(3):
        calls = shared.calls
        append_to_trees(together, [rng.integers(0, VOCAB, K) for _ in range(3)])
        assert shared.calls == calls + 1
    # a bad sequence for one tree stores nothing in any tree
    counts = [t.counts for t in together]
    with pytest.raises(TreeInputError):
        append_to_trees(together, [np.arange(5), np.asarray([VOCAB]), np.arange(3)])
    assert [t.counts for t in together] == counts
    with pytest.raises(ValueError, match="3 trees but 2"):
        append_to_trees(together, [np.arange(5)] * 2)


def test_bfloat16_storage_holds_rounded_gists_and_feeds_them_to_lod2():
    mc = dataclasses.replace(MC, gist_dtype="bfloat16")
    tokens = stream()[:2100]
    t = memory_tree(tokens, mc)
    f32 = reference(len(stream()))
    assert t.gists(1).dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(t.gists(1), f32.gists(1)[:65].astype(ml_dtypes.bfloat16))
    lod2 = np.asarray(gist_blocks(gist_params(), CFG.gist,
                                  t.gists(1)[:64].astype(np.float32).reshape(2, K, D), 2))
    chex.assert_trees_all_close(t.gists(2).astype(np.float32),
                                lod2.astype(ml_dtypes.bfloat16).astype(np.float32),
                                atol=2e-2, rtol=2e-2)
    assert_tree_invariants(t, tokens)
    v = t.view()
    assert v.gists[0].dtype == jnp.bfloat16
    assert_view_matches(t, v)


@pytest.mark.parametrize("bad, match", [
    (np.array([1, -1, 2]), r"\[0, 263\)"),
    (np.array([1, VOCAB]), r"\[0, 263\)"),
    (np.array([1.0, 2.0]), "integers"),
    (np.zeros((2, 3), np.int32), "1-D"),
    ("abc", "1-D"),
])
def test_append_rejects_bad_tokens_and_leaves_the_tree_unchanged(bad, match):
    t = memory_tree(stream()[:40])
    with pytest.raises(TreeInputError, match=match):
        t.append(bad)
    assert t.counts == (40, 1, 0)


def test_empty_append_changes_nothing():
    t = memory_tree(stream()[:40])
    r = t.append([])
    assert t.counts == (40, 1, 0) and r.new_nodes == ((40, 40), (1, 1), (0, 0))


# --------------------------------------------------------------------------- device view


def assert_view_matches(t: MegaContextTree, view) -> None:
    chex.assert_equal(view.num_levels, t.num_levels)
    np.testing.assert_array_equal(np.asarray(view.counts), t.counts)
    n0 = t.counts[0]
    tok = np.asarray(view.tokens)
    chex.assert_type(view.tokens, jnp.int32)
    np.testing.assert_array_equal(tok[:n0], t.tokens().astype(np.int32))
    assert not tok[n0:].any(), "padding must be zero"
    for level in range(1, t.num_levels + 1):
        g = np.asarray(view.gists[level - 1])
        n = t.counts[level]
        chex.assert_shape(g, (view.capacity(level), D))
        assert g[:n].tobytes() == t.gists(level).tobytes()
        assert not g[n:].any(), "padding must be zero"


def test_view_grows_by_doubling_and_holds_exactly_the_stored_rows():
    t = MegaContextTree.in_memory(MC, make_gister())
    tokens = stream()
    shapes, old = [], None
    for stop in (5, 64, 65, 1000, 1100, 2048, 2300, 3000, len(tokens)):
        t.append(tokens[t.num_tokens:stop])
        v = t.view()
        assert_view_matches(t, v)
        caps = tuple(v.capacity(l) for l in range(3))
        assert all(c & (c - 1) == 0 and c >= 64 for c in caps)  # powers of two
        shapes.append(caps)
        if old is not None:  # an earlier view is a value: later appends never change it
            assert_view_matches(*old)
        old = (memory_tree(tokens[:stop]), v)
    assert len(set(shapes)) <= 1 + int(np.log2(len(tokens) / 64)) + 1


def test_fixed_view_capacity_keeps_shapes_and_raises_when_exceeded():
    t = MegaContextTree.in_memory(MC, make_gister(), view_capacity_tokens=1100)
    t.append(stream()[:700])
    v1 = t.view()
    t.append(stream()[700:1100])
    v2 = t.view()
    assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, v2)
    assert (v2.capacity(0), v2.capacity(1), v2.capacity(2)) == (1100, 35, 2)
    assert_view_matches(t, v2)
    t.append(stream()[1100:1101])
    with pytest.raises(TreeCapacityError, match="LOD0 holds 1101"):
        t.view()


def test_view_update_and_write_view_bring_a_batched_view_up_to_each_streams_rows():
    """The one uploader of tree rows (the runtime's, and `view()`'s with one stream): each
    stream's rows since `synced`, gathered on the host and scattered on the device, give
    the view a hand-built numpy array holds — the stored rows, zeros after them."""
    trees = [memory_tree(stream()[:40]), memory_tree(stream()[:1100])]
    caps = (2048, 64, 8)
    view = TreeView(tokens=jnp.zeros((2, caps[0]), jnp.int32),
                    gists=tuple(jnp.zeros((2, caps[l], D), jnp.float32) for l in (1, 2)),
                    counts=jnp.zeros((2, 3), jnp.int32))
    synced = np.zeros((2, 3), np.int64)
    write = jax.jit(write_view)
    for grow in ((), (stream()[40:1500], stream()[1100:1101])):
        for t, tokens in zip(trees, grow):
            t.append(tokens)
        update = view_update(trees, synced)
        view, synced = write(view, *update), update[4]
        np.testing.assert_array_equal(np.asarray(view.counts), [t.counts for t in trees])
        for b, t in enumerate(trees):
            want = np.zeros(caps[0], np.int32)
            want[:t.num_tokens] = t.tokens()
            np.testing.assert_array_equal(np.asarray(view.tokens[b]), want)
            for level in (1, 2):
                want = np.zeros((caps[level], D), np.float32)
                want[:t.counts[level]] = t.gists(level)
                assert np.asarray(view.gists[level - 1][b]).tobytes() == want.tobytes()
    assert view_update(trees, synced) is None


# --------------------------------------------------------------------------- on disk


def disk_tree(path, **kw) -> MegaContextTree:
    return MegaContextTree.create(path, MC, make_gister(), model_name=MODEL,
                                  gist_checkpoint_id="ckpt-0", **kw)


def open_tree(path, mc: MCConfig = MC, **kw) -> MegaContextTree:
    kw.setdefault("model_name", MODEL)
    return MegaContextTree.open(path, mc, make_gister(block_size=mc.block_size), **kw)


def test_disk_write_close_reopen_gives_identical_arrays(tmp_path):
    tokens = stream()
    with disk_tree(tmp_path) as t:
        append_in_chunks(t, tokens, (1000, 33, 7, 1))
        assert_trees_identical(t, reference(len(tokens)))
        assert_view_matches(t, t.view())
    with open_tree(tmp_path, gist_checkpoint_id="ckpt-0") as r:
        assert r.backend == "disk" and r.recovered_bytes == (0, 0, 0)
        assert_trees_identical(r, reference(len(tokens)))
        assert_tree_invariants_after_reopen(r, tokens)
        assert_view_matches(r, r.view())
        for level in range(3):  # file size is exactly header + counted rows
            size = (tmp_path / level_filename(level)).stat().st_size
            assert size == r.nbytes()[level] == HEADER_SIZE + r.counts[level] * (
                4 if level == 0 else 4 * D)


def assert_tree_invariants_after_reopen(t: MegaContextTree, tokens: np.ndarray) -> None:
    T = len(tokens)
    assert t.counts == (T, T // K, T // K**2)
    np.testing.assert_array_equal(t.tokens(), tokens)
    np.testing.assert_array_equal(t.ingest_buffer, tokens[(T // K) * K:])


@settings(max_examples=8)
@given(n=st.integers(0, 2200), split=st.integers(0, 2200), sizes=chunks_strategy())
def test_disk_backend_reopened_mid_stream_continues_bit_for_bit(n, split, sizes):
    tokens = stream()[:n]
    split = min(split, n)
    with tempfile.TemporaryDirectory() as d:
        with disk_tree(d) as t:
            append_in_chunks(t, tokens[:split], sizes)
        with open_tree(d) as t:
            append_in_chunks(t, tokens[split:], sizes[::-1])
            assert_trees_identical(t, memory_tree(tokens))
            assert t.stats.blocks_gisted[1] == n // K - split // K  # nothing re-gisted


def test_header_layout_is_the_spec_format(tmp_path):
    with disk_tree(tmp_path) as t:
        t.append(stream()[:1100])
    import zlib
    for level, (dim, code, n) in enumerate([(1, 0, 1100), (D, 3, 34), (D, 3, 1)]):
        raw = (tmp_path / level_filename(level)).read_bytes()
        magic, version, lv, bs, d, c, count = struct.unpack_from("<IHHHHHQ", raw, 0)
        assert (magic, version, lv, bs, d, c, count) == (MAGIC, 2, level, K, dim, code, n)
        assert raw[22:54].rstrip(b"\0") == MODEL.encode()
        # version 2: rows per checksum group (about 4 KiB of rows), the CRC32 of the rows
        # after the last complete group, the CRC32 of header bytes [0, 60)
        group, tail, head = struct.unpack_from("<HII", raw, 54)
        assert group == max(16, 4096 // (dim * 4)) and head == zlib.crc32(raw[:60])
        assert len(raw) == 64 + n * dim * 4
        row, full = dim * 4, n // group
        assert tail == zlib.crc32(raw[64 + full * group * row:])
        sums = (tmp_path / level_filename(level)).with_suffix(".crc").read_bytes()
        assert sums == b"".join(struct.pack("<I", zlib.crc32(
            raw[64 + g * group * row:64 + (g + 1) * group * row])) for g in range(full))
    raw = (tmp_path / "LOD0.ctx").read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw[64:], "<u4"), stream()[:1100])
    raw = (tmp_path / "LOD1.ctx").read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw[64:], "<f4").reshape(34, D),
                                  reference(len(stream())).gists(1)[:34])


def test_bfloat16_store_writes_dtype_code_2_and_reopens(tmp_path):
    mc = dataclasses.replace(MC, gist_dtype="bfloat16")
    with MegaContextTree.create(tmp_path, mc, make_gister(), model_name=MODEL) as t:
        t.append(stream()[:1100])
        expect = t.gists(1)
    assert read_header(tmp_path / "LOD1.ctx").dtype_code == 2
    assert (tmp_path / "LOD1.ctx").stat().st_size == 64 + 34 * D * 2
    with open_tree(tmp_path, mc) as r:
        assert r.gists(1).tobytes() == expect.tobytes()
    with pytest.raises(MetadataError, match="gist_dtype"):
        open_tree(tmp_path)  # configured float32


def test_create_refuses_to_overwrite_an_existing_store(tmp_path):
    disk_tree(tmp_path).close()
    with pytest.raises(StoreExistsError):
        disk_tree(tmp_path)
    with disk_tree(tmp_path, overwrite=True) as t:
        assert t.counts == (0, 0, 0)
    with pytest.raises(ValueError, match="at most 32"):
        MegaContextTree.create(tmp_path / "x", MC, make_gister(), model_name="m" * 33)


def test_a_store_has_one_writer_at_a_time(tmp_path):
    t = disk_tree(tmp_path)
    t.append(stream()[:100])
    with pytest.raises(StoreLockedError, match="open for writing elsewhere"):
        open_tree(tmp_path)
    with pytest.raises(StoreLockedError):
        disk_tree(tmp_path, overwrite=True)
    # The failed attempts changed nothing: the writer goes on, and the store reopens.
    t.append(stream()[100:1100])
    t.close()
    with pytest.warns(UserWarning, match="gist_batch=16, now 5"):
        r = MegaContextTree.open(tmp_path, MC, make_gister(gist_batch=5), model_name=MODEL)
    with r:
        assert_trees_identical(r, reference(1100))


def test_torn_tail_is_truncated_on_open_and_appending_continues(tmp_path):
    tokens = stream()
    with disk_tree(tmp_path) as t:
        t.append(tokens[:1500])
    # A crash mid-append: LOD0 got one counted-never row and half of another; LOD1 got
    # a full uncounted row plus a partial one; LOD2 got a few stray bytes.
    with open(tmp_path / "LOD0.ctx", "ab") as f:
        f.write(np.array([5, 6], "<u4").tobytes()[:6])
    with open(tmp_path / "LOD1.ctx", "ab") as f:
        f.write(np.ones(D + 7, "<f4").tobytes())
    with open(tmp_path / "LOD2.ctx", "ab") as f:
        f.write(b"\x01\x02\x03")
    with open_tree(tmp_path) as r:
        assert r.recovered_bytes == (6, (D + 7) * 4, 3)
        assert_files_hold_exactly_the_counted_rows(tmp_path, r)
        assert_trees_identical(r, reference(1500))
        r.append(tokens[1500:1501])  # shorter than the torn tail: no stale bytes may remain
        assert_files_hold_exactly_the_counted_rows(tmp_path, r)
        r.append(tokens[1501:])
        assert_trees_identical(r, reference(len(tokens)))
    with open_tree(tmp_path) as r:
        assert r.recovered_bytes == (0, 0, 0)
        assert_trees_identical(r, reference(len(tokens)))


def assert_files_hold_exactly_the_counted_rows(path: Path, t: MegaContextTree) -> None:
    """... and the checksum files exactly the checksums of the complete groups."""
    for level in range(t.num_levels + 1):
        row = 4 if level == 0 else 4 * D
        assert (path / level_filename(level)).stat().st_size == HEADER_SIZE + t.counts[level] * row
        group = read_header(path / level_filename(level)).group_rows
        assert (path / level_filename(level)).with_suffix(".crc").stat().st_size == \
            4 * (t.counts[level] // group)


def test_gists_lost_in_a_crash_are_made_on_open(tmp_path):
    """LOD0 durable but the gists' header updates never happened: reopen gists the
    complete blocks again, giving the tree of the recovered LOD0 prefix. (metadata.json
    is as create wrote it: a crash comes before the close that would record counts.)"""
    with disk_tree(tmp_path) as t:
        t.append(stream()[:2100])
    _set_metadata(tmp_path, counts=[0, 0, 0])
    _rewind(tmp_path / "LOD1.ctx", 40)  # rows 40.. become a torn tail
    _rewind(tmp_path / "LOD2.ctx", 0)
    with open_tree(tmp_path) as r:
        assert r.recovered_bytes[1:] == ((65 - 40) * D * 4, 2 * D * 4)
        assert r.stats.blocks_gisted == [0, 25, 2]
        assert_files_hold_exactly_the_counted_rows(tmp_path, r)
        assert_trees_identical(r, reference(2100))


WRITER = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax.traverse_util import unflatten_dict
from mcjax.config import get_config
from mcjax.tree import BlockGister, MegaContextTree

path, blob = sys.argv[1:]
data = dict(np.load(blob))
table = jnp.asarray(data.pop("__embed__"))
tokens, bounds = data.pop("__tokens__"), data.pop("__bounds__")
gparams = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in data.items()})
cfg = get_config("tiny")
gister = BlockGister(cfg.gist, gparams, lambda ids: jnp.take(table, ids, axis=0),
                     embed_dim=table.shape[1], block_size=cfg.mc.block_size,
                     vocab_size=table.shape[0], gist_batch=16)
t = MegaContextTree.create(path, cfg.mc, gister, model_name=MODEL_NAME)
for start, stop in bounds:
    t.append(tokens[start:stop])
    print(stop, flush=True)  # acknowledged: durable from here on
"""


WRITER_TOKENS = 12_000  # far more than the writer reaches before the kill


def _writer_bounds():
    rng = np.random.default_rng(3)
    sizes = rng.choice([1, 7, 31, 32, 33, 97, 300], size=1000)
    ends = np.minimum(np.cumsum(sizes), WRITER_TOKENS)
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(a), int(b)) for a, b in zip(starts, ends) if b > a]


def test_writer_killed_with_sigkill_recovers_every_complete_entry(tmp_path):
    """A separate process appends (same params, saved to a file: a lighter start); we
    SIGKILL it mid-stream, reopen, compare with an in-memory tree, and keep appending."""
    from flax.traverse_util import flatten_dict

    bounds = _writer_bounds()
    tokens = stream(WRITER_TOKENS, seed=5)
    blob = tmp_path / "writer_inputs.npz"
    np.savez(blob, __embed__=np.asarray(base_params()["embed"]["embedding"]),
             __tokens__=tokens, __bounds__=np.asarray(bounds),
             **{"/".join(k): np.asarray(v) for k, v in flatten_dict(gist_params()).items()})
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.replace("MODEL_NAME", repr(MODEL)), str(store), str(blob)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu",
             "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    acked = 0
    deadline = time.monotonic() + 240
    try:
        while acked < 1500:  # past the first LOD2 node, then kill mid-stream
            line = proc.stdout.readline()
            assert line, f"writer died: {proc.stderr.read()}"
            acked = int(line)
            assert time.monotonic() < deadline, "writer too slow"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open_tree(store) as r:
        n = r.num_tokens
        # Every acknowledged entry survived; at most the append in flight is lost or kept.
        assert n >= acked
        assert n in {stop for _, stop in bounds}
        assert n < len(tokens), "writer finished before it was killed; kill sooner"
        assert_files_hold_exactly_the_counted_rows(store, r)
        assert_trees_identical(r, memory_tree(tokens[:n]))
        append_in_chunks(r, tokens[n:], (33, 1000, 7))
        assert_trees_identical(r, memory_tree(tokens))


# --------------------------------------------------------------------------- corrupt files


def _patch(path: Path, offset: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _patch_header(path: Path, offset: int, fmt: str, value) -> None:
    """Patch a header field and reseal the header checksum: a well-formed header (of
    another configuration), not a damaged one."""
    import zlib
    _patch(path, offset, fmt, value)
    _patch(path, 60, "<I", zlib.crc32(path.read_bytes()[:60]))


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


CORRUPTIONS = {  # header fields are patched with a resealed header checksum
    "wrong_magic": (lambda d: _patch_header(d / "LOD1.ctx", 0, "<I", 0x4D434355),
                    BadMagicError, r"LOD1\.ctx: magic is 0x4D434355"),
    "wrong_version": (lambda d: _patch_header(d / "LOD0.ctx", 4, "<H", 3),
                      UnsupportedVersionError, "format version 3"),
    "wrong_level": (lambda d: _patch_header(d / "LOD2.ctx", 6, "<H", 1),
                    LevelMismatchError, "header says level 1, expected 2"),
    "wrong_block_size": (lambda d: _patch_header(d / "LOD1.ctx", 8, "<H", 31),
                         BlockSizeMismatchError, "block_size 31"),
    "wrong_dim": (lambda d: _patch_header(d / "LOD2.ctx", 10, "<H", D + 1),
                  EmbeddingDimMismatchError, f"embedding_dim {D + 1}"),
    "wrong_lod0_dim": (lambda d: _patch_header(d / "LOD0.ctx", 10, "<H", D),
                       EmbeddingDimMismatchError, f"embedding_dim {D} in the header, "
                                                  f"expected 1"),
    "wrong_dtype": (lambda d: _patch_header(d / "LOD1.ctx", 12, "<H", 1),
                    DtypeMismatchError, r"header dtype float16 \(code 1\), expected float32"),
    "unknown_dtype": (lambda d: _patch_header(d / "LOD0.ctx", 12, "<H", 9),
                      DtypeMismatchError, "unknown dtype code 9"),
    "shorter_than_header_says": (lambda d: _truncate(d / "LOD1.ctx", 64 + 33 * D * 4 + 5),
                                 TruncatedFileError, "header counts 34 entries"),
    "shorter_than_a_header": (lambda d: _truncate(d / "LOD2.ctx", 40),
                              TruncatedFileError, "shorter than the 64-byte header"),
    "count_beyond_file": (lambda d: _patch_header(d / "LOD0.ctx", 14, "<Q", 1101),
                          TruncatedFileError, "header counts 1101 entries"),
    "damaged_header": (lambda d: _patch(d / "LOD1.ctx", 60, "<B", 7),
                       HeaderChecksumError, r"LOD1\.ctx: header bytes \[0, 64\) do not "
                                            r"match the header checksum"),
    "other_model": (lambda d: _patch_header(d / "LOD0.ctx", 22, "<32s", b"gpt2"),
                    ModelMismatchError, "written for model 'gpt2'"),
    "missing_level_file": (lambda d: (d / "LOD2.ctx").unlink(),
                           MissingStoreFileError, "LOD2.ctx: missing"),
    "level_file_is_a_directory": (lambda d: ((d / "LOD2.ctx").unlink(),
                                             (d / "LOD2.ctx").mkdir()),
                                  MissingStoreFileError, "LOD2.ctx: a directory"),
    "missing_checksum_file": (lambda d: (d / "LOD1.crc").unlink(),
                              MissingStoreFileError, "LOD1.crc: missing checksum file"),
    "checksum_file_too_short": (lambda d: _truncate(d / "LOD1.crc", 3),
                                TruncatedFileError, r"LOD1\.crc: 3 bytes, but LOD1\.ctx "
                                                    r"counts 34 rows"),
    "missing_metadata": (lambda d: (d / "metadata.json").unlink(),
                         MissingStoreFileError, "metadata.json is missing"),
    "garbled_metadata": (lambda d: (d / "metadata.json").write_text("{not json"),
                         MetadataError, "unreadable"),
    "binary_metadata": (lambda d: (d / "metadata.json").write_bytes(b"\xff\xfe{}"),
                        MetadataError, "unreadable"),
    "edited_metadata": (lambda d: (d / "metadata.json").write_text(
        (d / "metadata.json").read_text().replace('"gist_checkpoint_id": "ckpt-0"',
                                                  '"gist_checkpoint_id": "ckpt-1"')),
                        MetadataChecksumError, "does not match its checksum"),
    "metadata_version_99": (lambda d: _set_metadata(d, format_version=99),
                            UnsupportedVersionError, "format_version 99"),
    "metadata_bad_counts": (lambda d: _set_metadata(d, counts=[1100, 34]),
                            MetadataError, "one non-negative integer per level"),
    # LOD0 lost rows that LOD1 gists summarise: never silently keep orphan gists.
    "orphan_gists": (lambda d: _rewind(d / "LOD0.ctx", 1000),
                     InconsistentLevelsError, "LOD1 has 34 entries"),
}


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine")
    with disk_tree(path) as t:
        t.append(stream()[:1100])  # counts (1100, 34, 1)
    return path


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_kind_of_corrupt_file_raises_its_own_error(kind, pristine_store, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for f in pristine_store.iterdir():
        (store / f.name).write_bytes(f.read_bytes())
    with open_tree(store) as t:  # the copy itself is fine
        assert t.counts == (1100, 34, 1)
    corrupt, error, match = CORRUPTIONS[kind]
    corrupt(store)
    with pytest.raises(error, match=match):
        open_tree(store)


def test_open_rejects_a_store_written_for_another_configuration(pristine_store):
    with pytest.raises(MetadataError, match="block_size is 32, the configuration says 16"):
        open_tree(pristine_store, dataclasses.replace(MC, block_size=16))
    with pytest.raises(MetadataError, match="checkpoint 'ckpt-0', not 'ckpt-1'"):
        open_tree(pristine_store, gist_checkpoint_id="ckpt-1")
    with pytest.raises(ModelMismatchError):
        open_tree(pristine_store, model_name="other")


# --------------------------------------------------------------------------- read pass


def hidden_gist_cfg(read_chunk: int = 64, input_layer: int = 2):
    return dataclasses.replace(CFG.gist, input="hidden", input_layer=input_layer,
                               read_chunk=read_chunk)


@functools.lru_cache(maxsize=None)
def hidden_gister(read_chunk: int = 64, input_layer: int = 2, gist_batch: int = 4
                  ) -> BlockGister:
    return BlockGister.from_base(hidden_gist_cfg(read_chunk, input_layer), gist_params(),
                                 base_params(), CFG.base_config, block_size=K,
                                 gist_batch=gist_batch)


def gists_from_layer_hidden(tokens: np.ndarray, gcfg) -> tuple[np.ndarray, np.ndarray]:
    """LOD1 and LOD2 gists computed from `layer_hidden` of the whole history at once."""
    from mcjax.base.model import layer_hidden

    n = len(tokens) // K
    feats = layer_hidden(base_params(), CFG.base_config, np.asarray(tokens)[None],
                         layer=gcfg.input_layer, chunk=gcfg.read_chunk)[0, :n * K]
    lod1 = np.asarray(gist_blocks(gist_params(), gcfg, feats.reshape(n, K, D), 1))
    g = n // K
    lod2 = np.asarray(gist_blocks(gist_params(), gcfg,
                                  jnp.asarray(lod1[:g * K]).reshape(g, K, D), 2))
    return lod1, lod2


# R = 64: two blocks per chunk; R = 80: blocks straddle chunk boundaries (R % K != 0).
@pytest.mark.parametrize("read_chunk", [64, 80])
def test_read_pass_features_agree_fed_whole_or_in_pieces_and_repeat_bit_for_bit(read_chunk):
    """Complete chunks are read whole, the open chunk by cached steps: trees fed whole or
    in pieces agree to fp32 rounding (and to the bit for the same pieces)."""
    gister = hidden_gister(read_chunk)
    tokens = stream()[:1100]  # counts (1100, 34, 1)
    whole = memory_tree(tokens, gister=gister)
    for sizes in ((1, 7, 31, 33, 100), (32,), (5, 1000)):
        pieces, again = (MegaContextTree.in_memory(MC, gister) for _ in range(2))
        append_in_chunks(pieces, tokens, sizes)
        append_in_chunks(again, tokens, sizes)
        assert_trees_identical(pieces, again)  # the same feeding: bit for bit
        assert pieces.counts == whole.counts
        for level in (1, 2):
            np.testing.assert_allclose(pieces.gists(level), whole.gists(level),
                                       rtol=1e-5, atol=1e-5)
    # ... and equal to the gists of `layer_hidden` over the whole history (the same
    # numbers, computed in other batch shapes: equal to fp32 rounding)
    lod1, lod2 = gists_from_layer_hidden(tokens, gister.cfg)
    np.testing.assert_allclose(whole.gists(1), lod1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole.gists(2), lod2, rtol=1e-5, atol=1e-5)
    # the read pass really is what GistNet saw: not the embedding gists, and a block's gist
    # depends on the earlier tokens of its chunk
    assert not np.allclose(whole.gists(1), reference(1100).gists(1), atol=1e-3)
    other = tokens.copy()
    other[0] = (other[0] + 1) % VOCAB
    changed = memory_tree(other, gister=gister).gists(1)
    first_chunk_blocks = -(-read_chunk // K)  # blocks with a token in chunk 0
    assert not np.allclose(changed[1], whole.gists(1)[1], atol=1e-6)
    np.testing.assert_array_equal(changed[first_chunk_blocks:],
                                  whole.gists(1)[first_chunk_blocks:])


def test_read_pass_reads_each_token_once_in_bulk_and_streaming():
    """Bulk: one whole read per complete chunk and one cached step per block of the open
    chunk; streaming: one cached step per new block, the block that completes a chunk
    too (a whole read there would read the chunk's earlier tokens again) — the old read
    re-read a chunk's prefix for every block.
    A copy (no read state) replays its open chunk's prefix by the same steps and stays
    bit-identical to the original."""
    gister = BlockGister.from_base(hidden_gist_cfg(128), gist_params(), base_params(),
                                   CFG.base_config, block_size=K, gist_batch=4)
    t = MegaContextTree.in_memory(MC, gister)
    t.append(stream()[:1100])  # 34 blocks: 8 whole chunks of 128 + 2 steps; 9 + 1 gist calls
    assert gister.read_calls == 8 + 2 and t.stats.gist_calls == 9 + 1
    tokens_read = gister.reader.tokens_read
    for i in range(4):  # streaming: one call per new block, each token read once
        t.append(stream()[1100 + 32 * i:1132 + 32 * i])
        assert gister.read_calls == 11 + i
        assert gister.reader.tokens_read == tokens_read + 32 * (i + 1)
    assert t.counts[1] == 38  # the open chunk [1152, 1280) holds 2 blocks
    copy = MegaContextTree.in_memory(MC, gister)
    copy_rows(t, copy)
    calls = gister.read_calls
    copy.append(stream()[1228:1260])  # replays the open chunk's 2 blocks, then 1 step
    t.append(stream()[1228:1260])
    assert gister.read_calls == calls + 3 + 1
    assert_trees_identical(copy, t)


def test_store_records_the_gist_input_and_refuses_another(tmp_path):
    gister = hidden_gister(64)
    tokens = stream()[:1500]
    with MegaContextTree.create(tmp_path, MC, gister, model_name=MODEL) as t:
        t.append(tokens[:700])
    import json
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert (meta["gist_input"], meta["input_layer"], meta["read_chunk"]) == ("hidden", 2, 64)
    with pytest.raises(MetadataError, match=r"made from GistNet input 'hidden' \(layer 2, "
                                            r"read_chunk 64\), but this GistNet reads "
                                            r"'embeddings'"):
        MegaContextTree.open(tmp_path, MC, make_gister(), model_name=MODEL)
    with pytest.raises(MetadataError, match=r"reads 'hidden' \(layer 1, read_chunk 64\)"):
        MegaContextTree.open(tmp_path, MC, hidden_gister(64, input_layer=1), model_name=MODEL)
    with pytest.raises(MetadataError, match=r"reads 'hidden' \(layer 2, read_chunk 80\)"):
        MegaContextTree.open(tmp_path, MC, hidden_gister(80), model_name=MODEL)
    # reopened with the same input, appends continue exactly as an uninterrupted tree fed
    # the same pieces (the open chunk's earlier tokens are read back from LOD0 and replayed)
    uninterrupted = MegaContextTree.in_memory(MC, gister)
    uninterrupted.append(tokens[:700])
    uninterrupted.append(tokens[700:])
    with MegaContextTree.open(tmp_path, MC, gister, model_name=MODEL) as r:
        r.append(tokens[700:])
        assert_trees_identical(r, uninterrupted)


def test_store_from_before_the_read_pass_counts_as_embedding_input(pristine_store, tmp_path):
    import json
    store = tmp_path / "store"
    store.mkdir()
    for f in pristine_store.iterdir():
        (store / f.name).write_bytes(f.read_bytes())
    meta = json.loads((store / "metadata.json").read_text())
    for key in ("gist_input", "input_layer", "read_chunk", "read"):
        meta.pop(key)
    (store / "metadata.json").write_text(json.dumps(meta))
    _set_metadata(store)  # reseal its checksum
    open_tree(store).close()
    with pytest.raises(MetadataError, match="made from GistNet input 'embeddings'"):
        MegaContextTree.open(store, MC, hidden_gister(64), model_name=MODEL)


def test_hidden_input_needs_a_reader_and_a_layer_the_base_model_has():
    with pytest.raises(ValueError, match="pass a reader"):
        BlockGister(hidden_gist_cfg(), gist_params(), lambda ids: ids, embed_dim=D,
                    block_size=K)
    with pytest.raises(ValueError, match="input_layer=4, but the base model has only 3"):
        BlockGister.from_base(hidden_gist_cfg(input_layer=4), gist_params(), base_params(),
                              CFG.base_config, block_size=K)


# --------------------------------------------------------------------------- integrity


def _copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _snapshot(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("count", [1000, 1090, 0])
def test_a_lowered_header_count_is_an_error_and_opening_changes_no_file(count, pristine_store,
                                                                         tmp_path):
    """Issue 33 defect 2: 1100 -> 1000 truncated LOD0 before raising; 1100 -> 1090 opened
    silently with 10 complete tokens dropped as a 'torn tail'. Edited in place the count
    breaks the header checksum; resealed (a header consistent in itself, the partial
    group's checksum recomputed) it is lost entries (or orphan gists)."""
    store = _copy_store(pristine_store, tmp_path / "store")
    before = _snapshot(store)
    _patch(store / "LOD0.ctx", 14, "<Q", count)
    damaged = _snapshot(store)
    with pytest.raises(HeaderChecksumError, match=r"LOD0\.ctx: header bytes"):
        open_tree(store)
    assert _snapshot(store) == damaged
    (store / "LOD0.ctx").write_bytes(before["LOD0.ctx"])
    _rewind(store / "LOD0.ctx", count)
    damaged = _snapshot(store)
    with pytest.raises(InconsistentLevelsError,
                       match="LOD1 has 34" if count < 1088 else "records 1100 entries"):
        open_tree(store)
    assert _snapshot(store) == damaged


def _flip(path: Path, offset: int, xor: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ xor]))


BODY_DAMAGE = {  # what a flipped or overwritten body byte does to a pristine (1100, 34, 1)
    "token_above_vocab": (lambda d: _patch(d / "LOD0.ctx", HEADER_SIZE + 4 * 3, "<I", 70_000),
                          TokenRangeError, r"LOD0\.ctx: token id 70000 is outside the "
                                           r"vocabulary \[0, 263\) \(row 3, byte offset 76"),
    "token_in_vocab": (lambda d: _flip(d / "LOD0.ctx", HEADER_SIZE + 4 * 700, 0x01),
                       RowChecksumError, r"LOD0\.ctx: rows \[0, 1024\) \(bytes \[64, 4160\)\) "
                                         r"do not match their checksum \(entry 0 at byte 0 "
                                         r"of LOD0\.crc\)"),
    "gist_row": (lambda d: _flip(d / "LOD1.ctx", HEADER_SIZE + 30 * 4 * D + 5),
                 RowChecksumError, r"LOD1\.ctx: rows \[23, 34\) .*partial group's checksum "
                                   r"in the header"),
    "nan_gist": (lambda d: _patch(d / "LOD2.ctx", HEADER_SIZE + 8, "<f", float("nan")),
                 RowChecksumError, r"LOD2\.ctx: rows \[0, 1\)"),
    "checksum_entry": (lambda d: _flip(d / "LOD1.crc", 2),
                       RowChecksumError, r"LOD1\.ctx: rows \[0, 23\) \(bytes \[64, "),
}


@pytest.mark.parametrize("kind", sorted(BODY_DAMAGE))
def test_damaged_body_bytes_are_named_and_change_no_file(kind, pristine_store, tmp_path):
    """Issue 33 defect 7: flipped body bytes (a token id above the vocabulary, a gist row,
    a NaN) opened silently."""
    store = _copy_store(pristine_store, tmp_path / "store")
    damage, error, match = BODY_DAMAGE[kind]
    damage(store)
    before = _snapshot(store)
    with pytest.raises(error, match=match):
        open_tree(store)
    assert _snapshot(store) == before


def _rewind(path: Path, count: int) -> None:
    """Rewrite a level file's header as a crash would have left it before its rows from
    `count` on were counted: count, partial-group checksum and header checksum consistent
    (format version 2, module docstring); the rows stay (a torn tail)."""
    import zlib
    raw = bytearray(path.read_bytes())
    version, dim, code = struct.unpack_from("<H", raw, 4)[0], *struct.unpack_from("<HH", raw, 10)
    struct.pack_into("<Q", raw, 14, count)
    if version >= 2:
        group = struct.unpack_from("<H", raw, 54)[0]
        row = dim * (2 if code in (1, 2) else 4)
        first = HEADER_SIZE + (count // group) * group * row
        struct.pack_into("<I", raw, 56, zlib.crc32(raw[first:HEADER_SIZE + count * row]))
        struct.pack_into("<I", raw, 60, zlib.crc32(raw[:60]))
    path.write_bytes(bytes(raw[:HEADER_SIZE]) + path.read_bytes()[HEADER_SIZE:])


def _set_metadata(path: Path, **changes) -> None:
    """Rewrite metadata.json with `changes`, its checksum (format 2) recomputed."""
    import json
    import zlib
    meta = json.loads((path / "metadata.json").read_text())
    meta.update(changes)
    if "checksum" in meta:
        del meta["checksum"]
        body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        meta["checksum"] = f"crc32:{zlib.crc32(body):08x}"
    (path / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def test_header_counts_below_the_metadata_counts_are_lost_entries(pristine_store, tmp_path):
    """metadata.json counts are written only after the headers counting them are durable,
    so a header counting fewer entries lost complete ones: an error, never a 'torn tail'
    (issue 33 defect 2, 1100 -> 1090 with a header consistent in itself)."""
    store = _copy_store(pristine_store, tmp_path / "store")
    _rewind(store / "LOD0.ctx", 1090)  # LOD1's 34 blocks need only 1088 tokens
    before = _snapshot(store)
    with pytest.raises(LostEntriesError, match=r"metadata\.json records 1100 entries of "
                                                r"LOD0, but the header of LOD0\.ctx counts "
                                                r"only 1090"):
        open_tree(store)
    assert _snapshot(store) == before


def test_a_crash_leaves_stale_metadata_and_torn_tails_which_open_recovers(pristine_store,
                                                                          tmp_path):
    """What a crash may legitimately leave: metadata.json from the last open/flush (counts
    at or below the headers'), rows and checksums beyond the counted ones, higher levels
    behind their children. All recovered: the tree of the durable LOD0 prefix."""
    store = _copy_store(pristine_store, tmp_path / "store")
    _set_metadata(store, counts=[0, 0, 0])  # as create wrote it
    _rewind(store / "LOD1.ctx", 20)  # its .crc entry of rows [0, 23) becomes a torn tail
    _rewind(store / "LOD2.ctx", 0)
    with open(store / "LOD0.ctx", "ab") as f:
        f.write(np.array([5, 6], "<u4").tobytes()[:6])
    with open(store / "LOD0.crc", "ab") as f:
        f.write(b"\x01\x02")
    with open_tree(store) as r:
        assert r.recovered_bytes == (6, 14 * 4 * D, 4 * D)
        assert r.stats.blocks_gisted == [0, 14, 1]
        assert_files_hold_exactly_the_counted_rows(store, r)
        assert (store / "LOD0.crc").stat().st_size == 4 * (1100 // 1024)
        assert_trees_identical(r, reference(1100))
    with open_tree(store) as r:
        assert r.recovered_bytes == (0, 0, 0)
        assert_trees_identical(r, reference(1100))


def _to_version_1(store: Path) -> None:
    """Rewrite a store as the version-1 format wrote it: no checksums anywhere (headers
    with zero reserved bytes 54..64, no .crc files, metadata.json without "checksum")."""
    import json
    for f in store.glob("*.ctx"):
        raw = bytearray(f.read_bytes())
        struct.pack_into("<H", raw, 4, 1)
        raw[54:64] = bytes(10)
        f.write_bytes(bytes(raw))
    for f in store.glob("*.crc"):
        f.unlink()
    meta = json.loads((store / "metadata.json").read_text())
    meta.pop("checksum")
    meta["format_version"] = 1
    (store / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def test_a_version_1_store_opens_unverified_with_a_warning_and_stays_version_1(
        pristine_store, tmp_path):
    """Stores written before checksums (and the session saves holding them) stay readable:
    headers, lengths, level counts and token ids are checked, the rows cannot be; appends
    keep the file's format (no half-checksummed file)."""
    store = _copy_store(pristine_store, tmp_path / "store")
    _to_version_1(store)
    with pytest.warns(UserWarning, match="version-1 store .*before checksums"):
        r = open_tree(store)
    with r:
        assert_trees_identical(r, reference(1100))
        r.append(stream()[1100:2100])
    assert read_header(store / "LOD0.ctx").version == 1 and not list(store.glob("*.crc"))
    with pytest.warns(UserWarning, match="version-1 store"):
        r = open_tree(store)
    with r:
        assert_trees_identical(r, reference(2100))
    damaged = _copy_store(store, tmp_path / "damaged")
    _patch(damaged / "LOD0.ctx", HEADER_SIZE + 4 * 5, "<I", VOCAB)
    with pytest.warns(UserWarning), pytest.raises(TokenRangeError, match="token id 263"):
        open_tree(damaged)
    _patch(damaged / "LOD0.ctx", 60, "<B", 1)
    with pytest.warns(UserWarning), pytest.raises(CorruptHeaderError, match="reserved"):
        open_tree(damaged)


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    with disk_tree(path) as t:
        t.append(stream())  # counts (3109, 97, 3): checksum groups in LOD0 and LOD1
    return path


FUZZ_TRIALS = 200


def test_random_byte_flips_are_detected_or_provably_harmless(fuzz_store, tmp_path):
    """One byte flipped at a random offset of a header, a body, metadata.json or the
    checksum files, 200 seeded trials: every flip raises a specific StoreError subclass
    or leaves a store that opens to the original tree bit for bit (same metadata too)."""
    import collections
    import json
    import warnings as warnings_mod

    original = open_tree(fuzz_store)
    want_meta = json.loads((fuzz_store / "metadata.json").read_text())
    want = (original.counts, original.tokens().tobytes(),
            tuple(original.gists(l).tobytes() for l in (1, 2)))
    original.close()
    files = {"header": sorted(fuzz_store.glob("*.ctx")), "body": sorted(fuzz_store.glob("*.ctx")),
             "metadata": [fuzz_store / "metadata.json"],
             "checksums": [f for f in sorted(fuzz_store.glob("*.crc")) if f.stat().st_size]}
    assert len(files["checksums"]) == 2  # LOD0.crc, LOD1.crc (LOD2 has no complete group)
    rng = np.random.default_rng(33)
    outcomes = collections.Counter()
    by_region = collections.defaultdict(collections.Counter)
    t0 = time.perf_counter()
    for trial in range(FUZZ_TRIALS):
        region = sorted(files)[trial % 4]
        f = files[region][rng.integers(len(files[region]))]
        size = f.stat().st_size
        lo, hi = {"header": (0, HEADER_SIZE), "body": (HEADER_SIZE, size)}.get(region, (0, size))
        offset, xor = int(rng.integers(lo, hi)), int(rng.integers(1, 256))
        store = _copy_store(fuzz_store, tmp_path / f"t{trial}")
        _flip(store / f.name, offset, xor)
        try:
            with warnings_mod.catch_warnings():
                warnings_mod.simplefilter("ignore")  # (a version-1 claim warns, then fails)
                t = open_tree(store)
        except StoreError as e:
            outcome = type(e).__name__
        else:
            with t:
                got = (t.counts, t.tokens().tobytes(),
                       tuple(t.gists(l).tobytes() for l in (1, 2)))
            meta = json.loads((store / "metadata.json").read_text())
            assert got == want and meta == want_meta, \
                f"trial {trial}: {f.name} byte {offset} ^ {xor:#x} opened to other data"
            outcome = "harmless"
        outcomes[outcome] += 1
        by_region[region][outcome] += 1
    elapsed = time.perf_counter() - t0
    print(f"\nbyte-flip fuzz: {FUZZ_TRIALS} trials in {elapsed:.1f} s: {dict(outcomes)}")
    for region, c in sorted(by_region.items()):
        print(f"  {region}: {dict(c)}")
    assert sum(outcomes.values()) == FUZZ_TRIALS
    assert all(c.get("harmless", 0) == 0 for r, c in by_region.items() if r != "metadata"), \
        "every flip of a level or checksum file must be detected"


def test_retrieval_keys_are_checksummed_and_recovered_like_a_level(tmp_path):
    """KEYS.ctx has its KEYS.crc: a flipped byte is named; keys a crash left behind LOD0
    are read again on open."""
    from mcjax.retrieval import BlockKeys

    gister = BlockGister.from_base(CFG.gist, gist_params(), base_params(), CFG.base_config,
                                   block_size=K, retrieval=CFG.retrieval)
    keys = BlockKeys(CFG.retrieval, CFG.base_config, K)
    path = tmp_path / "store"
    with MegaContextTree.create(path, MC, gister, model_name=MODEL, block_keys=keys) as t:
        t.append(stream()[:1100])
        want = t.keys()
    assert (path / "KEYS.crc").exists()
    damaged = _copy_store(path, tmp_path / "damaged")
    _flip(damaged / "KEYS.ctx", HEADER_SIZE + 3)
    with pytest.raises(RowChecksumError, match=r"KEYS\.ctx: rows \[0, "):
        MegaContextTree.open(damaged, MC, gister, block_keys=keys)
    _set_metadata(path, counts=[0, 0, 0])
    _rewind(path / "KEYS.ctx", 20)
    with MegaContextTree.open(path, MC, gister, block_keys=keys) as r:
        assert r.keys().tobytes() == want.tobytes()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_a_crash_between_rows_checksums_and_header_loses_only_that_append(level, tmp_path,
                                                                           monkeypatch):
    """The writer dies after a level's rows and their group checksums are written but
    before its header counts them (deterministic, in-process): reopening trims both
    tails and gives the tree of what the headers counted, gists made again."""
    with disk_tree(tmp_path) as t:
        t.append(stream()[:1000])
    t = open_tree(tmp_path)
    real = store_format._pack_header

    def dies(lv, *a, **kw):
        if lv == level:
            raise KeyboardInterrupt("killed")
        return real(lv, *a, **kw)

    monkeypatch.setattr(store_format, "_pack_header", dies)
    with pytest.raises(KeyboardInterrupt):
        t.append(stream()[1000:2100])  # LOD0 groups 0..1 complete, LOD1 groups 1..2
    monkeypatch.setattr(store_format, "_pack_header", real)
    for s in t.stores:  # the process is gone: no metadata rewrite, no more writes
        s.close()
    with open_tree(tmp_path) as r:
        assert sum(r.recovered_bytes) > 0
        assert_files_hold_exactly_the_counted_rows(tmp_path, r)
        assert_trees_identical(r, reference(1000 if level == 0 else 2100))
        r.append(stream()[r.num_tokens:])
        assert_trees_identical(r, reference(len(stream())))


def test_opening_and_reading_an_intact_store_writes_nothing(pristine_store, tmp_path):
    """A store only read (a session save being loaded) is left as it was: metadata.json
    is not even rewritten with the same content."""
    store = _copy_store(pristine_store, tmp_path / "store")
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in store.iterdir()}
    with open_tree(store) as t:
        assert t.counts == (1100, 34, 1)
        t.view()
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in store.iterdir()} == before
