"""Evaluation tasks: the compressed layouts ΔNLL@H is measured at, passkey cases at a given
history length, the order in which a history is fed to a session, and input checks.

All pure and deterministic given their arguments (seeds included).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from mcjax.config import MCConfig
from mcjax.train import data, losses

__all__ = ["EvalInputError", "LayoutSpec", "nll_layouts", "default_keep_raw", "layouts_by_name",
           "batches_of", "locate_windows", "parse_int_list",
           "check_lengths", "passkey_cases", "feed_schedule", "byte_decode"]


class EvalInputError(ValueError):
    """Evaluation settings that cannot produce a meaningful result."""


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """One compressed window layout of the ΔNLL@H sweep."""

    name: str
    layout: losses.GistLayout

    @property
    def prefix_slots(self) -> int:
        """Slots the compressed prefix occupies: sink + gists + raw tail blocks."""
        lay = self.layout
        return lay.sink_len + lay.num_gists + lay.keep_raw_blocks * lay.block_size

    @property
    def context_ratio(self) -> float:
        """Whole-prefix compression: prefix tokens per slot of the compressed prefix."""
        return self.layout.prefix_len / self.prefix_slots

    @property
    def span_ratio(self) -> float:
        """Compression of the gisted span alone (tokens per gist; 32 for LOD1 only)."""
        return self.layout.compression_ratio

    def describe(self) -> dict:
        lay = self.layout
        return {"name": self.name, "prefix_len": lay.prefix_len, "horizon": lay.horizon,
                "keep_raw_blocks": lay.keep_raw_blocks, "sink_blocks": lay.sink_blocks,
                "lod2_gists": lay.lod2_groups, "lod1_gists": lay.lod1_blocks,
                "compressed_tokens": lay.compressed_tokens,
                "prefix_slots": self.prefix_slots, "context_ratio": self.context_ratio,
                "span_ratio": self.span_ratio}


def default_keep_raw(prefix_blocks: int, sink_blocks: int = 0) -> tuple[int, ...]:
    """Raw tail sizes (in blocks) of the default sweep: about half, an eighth, one block
    (each leaving at least one block to compress after the sink)."""
    keep = {max(1, prefix_blocks // 2), max(1, prefix_blocks // 8), 1}
    return tuple(sorted((k for k in keep if k < prefix_blocks - sink_blocks), reverse=True))


def nll_layouts(mc: MCConfig, prefix_len: int, keep_raw: Sequence[int] | None = None, *,
                horizon: int | None = None) -> list[LayoutSpec]:
    """Layouts of increasing compression: LOD1 gists with `keep_raw` newest blocks raw (the
    first `mc.sink_blocks` blocks stay raw as the sink), and for each the LOD1+LOD2 layout
    where a complete 1,024-token group exists. Sorted by whole-prefix compression ratio.
    Named `lod1_keep{k}` / `lod1+lod2_keep{k}` (as the GistNet trainer names them)."""
    K = mc.block_size
    if prefix_len <= 0 or prefix_len % K:
        raise EvalInputError(f"prefix length {prefix_len} must be a positive multiple of the "
                             f"block size {K}")
    blocks = prefix_len // K
    sink = mc.sink_blocks
    keep_raw = default_keep_raw(blocks, sink) if keep_raw is None else tuple(keep_raw)
    if not keep_raw:
        raise EvalInputError("no layouts: give at least one keep-raw block count")
    bad = [k for k in keep_raw if not 0 <= k < blocks - sink]
    if bad:
        raise EvalInputError(f"keep-raw block counts {bad} leave nothing to compress in a "
                             f"prefix of {blocks} blocks with a {sink}-block sink (need "
                             f"0 <= k < {blocks - sink})")
    specs: dict[losses.GistLayout, LayoutSpec] = {}
    for k in keep_raw:
        for lod2 in (False, True):
            lay = losses.GistLayout.build(mc, prefix_len, keep_raw_blocks=k, use_lod2=lod2,
                                          horizon=horizon)
            if lod2 and lay.lod2_groups == 0:
                continue
            name = f"{'lod1+lod2' if lay.lod2_groups else 'lod1'}_keep{k}"
            specs.setdefault(lay, LayoutSpec(name, lay))
    return sorted(specs.values(), key=lambda s: (s.context_ratio, s.name))


_LAYOUT_NAME = re.compile(r"^(lod1|lod1\+lod2)_keep(\d+)$")


def layouts_by_name(mc: MCConfig, prefix_len: int, names: Sequence[str], *,
                    horizon: int | None = None) -> list[LayoutSpec]:
    """The layouts named `lod1_keep{k}` / `lod1+lod2_keep{k}` (as `nll_layouts` names them),
    in the order given; a clear error for a malformed name or a LOD2 layout without a
    complete group."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise EvalInputError("no layout names given (e.g. lod1_keep1)")
    keep = []
    for n in names:
        m = _LAYOUT_NAME.match(n)
        if not m:
            raise EvalInputError(f"layout name {n!r} is not of the form lod1_keepK or "
                                 f"lod1+lod2_keepK")
        keep.append(int(m.group(2)))
    found = {s.name: s for s in nll_layouts(mc, prefix_len, tuple(dict.fromkeys(keep)),
                                            horizon=horizon)}
    missing = [n for n in names if n not in found]
    if missing:
        raise EvalInputError(f"layouts {missing} do not exist for a {prefix_len}-token prefix "
                             f"(available: {sorted(found)}; LOD2 needs a complete group of "
                             f"{mc.block_size} blocks to compress)")
    return [found[n] for n in dict.fromkeys(names)]


def batches_of(windows: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """Split windows [N, S] into batches of exactly `batch_size` rows (one compiled shape):
    the last batch is padded with copies of the last window. Returns (batch, real rows)."""
    windows = np.asarray(windows)
    if batch_size < 1:
        raise EvalInputError(f"batch size must be >= 1, got {batch_size}")
    if len(windows) == 0:
        raise EvalInputError("no windows to batch")
    out = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, 0)])
        out.append((chunk, real))
    return out


def locate_windows(corpus: data.TokenizedCorpus, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Where each window [N, S] lies in the corpus: "offset" (first token in the corpus),
    "doc" (document index), "doc_id" and "doc_offset" (first token inside the document);
    -1 / "" for a window not found. A window that occurs more than once gets its first
    occurrence that starts at a multiple of S inside its document (how
    `data.document_windows` cuts them), else its first occurrence."""
    tokens = np.asarray(corpus.tokens)
    windows = np.asarray(windows)
    S = windows.shape[1]
    starts = np.asarray(corpus.doc_starts)
    offset = np.full(len(windows), -1, np.int64)
    for i, w in enumerate(windows):
        cand = np.flatnonzero(tokens[: len(tokens) - S + 1] == w[0])
        for k in range(1, S):
            if len(cand) <= 1:
                break
            cand = cand[tokens[cand + k] == w[k]]
        cand = [c for c in cand if np.array_equal(tokens[c: c + S], w)]
        if cand:
            aligned = [c for c in cand
                       if (c - starts[np.searchsorted(starts, c, "right") - 1]) % S == 0]
            offset[i] = (aligned or cand)[0]
    doc = np.where(offset >= 0, np.searchsorted(starts, offset, "right") - 1, -1)
    return {"offset": offset, "doc": doc.astype(np.int64),
            "doc_offset": np.where(offset >= 0, offset - starts[np.maximum(doc, 0)], -1),
            "doc_id": np.asarray([corpus.doc_ids[d] if d >= 0 else "" for d in doc])}


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """"1024,2048" -> (1024, 2048): positive integers, duplicates dropped, sorted."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise EvalInputError(f"{what}: empty list (give comma-separated integers, e.g. "
                             f"1024,2048)")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise EvalInputError(f"{what}: {text!r} is not a comma-separated list of integers"
                             ) from None
    if min(values) <= 0:
        raise EvalInputError(f"{what}: values must be > 0, got {min(values)}")
    return tuple(sorted(set(values)))


def check_lengths(lengths: Sequence[int], w_max: int) -> None:
    """Passkey history lengths must exceed the working context: a history that fits in
    `w_max` raw tokens tests nothing MegaContext does."""
    if not lengths:
        raise EvalInputError("no passkey history lengths given")
    short = [n for n in lengths if n <= w_max]
    if short:
        raise EvalInputError(
            f"passkey history lengths {short} do not exceed W_max={w_max}: the task needs "
            f"histories longer than the working context (ideally >> W_max), e.g. "
            f"{2 * w_max},{4 * w_max}")


def passkey_cases(encode: Callable[[str], np.ndarray], length: int, num_cases: int, seed: int,
                  *, haystack: np.ndarray | None = None, key_digits: int = 5
                  ) -> list[data.RetrievalExample]:
    """`num_cases` passkey prompts of exactly `length` tokens (`data.make_retrieval_example`),
    needle depths evenly spaced over the history ((i + 0.5) / num_cases), keys and phrasings
    drawn from (seed, length)."""
    if num_cases < 1:
        raise EvalInputError(f"need at least one passkey case, got {num_cases}")
    rng = np.random.default_rng([seed, length])
    cases = []
    for i in range(num_cases):
        try:
            ex = data.make_retrieval_example(encode, length, rng, haystack=haystack,
                                             depth=(i + 0.5) / num_cases,
                                             key_digits=key_digits)
        except data.DataError as e:
            raise EvalInputError(f"cannot build a passkey case of {length} tokens: {e}") from e
        if len(ex.tokens) != length:
            raise EvalInputError(f"passkey case has {len(ex.tokens)} tokens, wanted {length}")
        cases.append(ex)
    return cases


def feed_schedule(length: int, block_size: int, refocus_steps: int) -> list[tuple[int, int]]:
    """Token ranges to feed a session: the bulk of the history at once (initial layout),
    then the last `refocus_steps` blocks one by one, so the session refocuses after each
    (LensNet sees the question arrive and can bring the needle back into focus)."""
    if length <= 0:
        raise EvalInputError(f"history length must be > 0, got {length}")
    steps = max(0, min(int(refocus_steps), (length - 1) // block_size))
    bulk = length - steps * block_size
    return [(0, bulk)] + [(bulk + i * block_size, bulk + (i + 1) * block_size)
                          for i in range(steps)]


def byte_decode(ids) -> str:
    """Text of byte tokens (the tiny random bases' tokenizer); ids >= 256 are dropped."""
    return bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < 256).decode(
        "utf-8", "replace")
