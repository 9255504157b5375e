"""Evaluation tasks: the compressed layouts ΔNLL@H is measured at, passkey cases at a given
history length, the order in which a history is fed to a session, and input checks.

All pure and deterministic given their arguments (seeds included).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from mcjax import data, scoring
from mcjax.config import MCConfig

__all__ = ["EvalInputError", "LayoutSpec", "nll_layouts", "default_keep_raw", "layouts_by_name",
           "batches_of", "locate_windows", "parse_int_list",
           "check_lengths", "passkey_cases", "needle_blocks", "feed_schedule"]


class EvalInputError(ValueError):
    """Evaluation settings that cannot produce a meaningful result."""


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """One compressed window layout of the ΔNLL@H sweep."""

    name: str
    layout: scoring.GistLayout

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
    specs: dict[scoring.GistLayout, LayoutSpec] = {}
    for k in keep_raw:
        for lod2 in (False, True):
            lay = scoring.GistLayout.build(mc, prefix_len, keep_raw_blocks=k, use_lod2=lod2,
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


PASSKEY_TASKS = ("passkey", "multikey_word", "multikey_number", "near_duplicate",
                 "paraphrase", "split")
# the look-alike tasks (SPEC §2.9): what each asks of focus
PASSKEY_TASK_NOTES = {
    "passkey": "one needle, phrased like the question",
    "multikey_word": "needles of one template 'the special magic number for WORD is N', one "
                     "WORD asked; the others are look-alikes",
    "multikey_number": "as multikey_word with 7-digit numeric keys",
    "near_duplicate": "as multikey_word with keys that differ in one character",
    "paraphrase": "one needle phrased unlike the question (no shared content words)",
    "split": "one needle whose value stands >= 2 blocks after its key phrase, in a sentence "
             "that does not name the key",
}
_KEY_WORDS = ("amber", "badger", "cobalt", "dune", "ember", "falcon", "garnet", "harbor",
              "iris", "juniper", "kestrel", "lantern", "maple", "nectar", "onyx", "pepper",
              "quartz", "raven", "saffron", "thistle", "umber", "velvet", "willow", "yarrow",
              "zephyr", "anchor", "birch", "cedar", "delta", "elm", "fjord", "glacier")
_PARAPHRASES = (  # (needle with {v}, question): no content word in common
    ("Before leaving, Dana scribbled the locker combination on her wrist: {v}.",
     "Which digits open the storage box at school? Those digits are"),
    ("Grandpa whispered that the safe opens only with {v}, and nobody else knows.",
     "What code unlocks the family vault? That code is"),
    ("The courier's parcel was tagged with tracking figure {v} before dawn.",
     "Under what reference can one follow the delivered package? The reference is"),
)
_NEAR_DUPLICATE_LETTERS = "abcdefghjkmnpqrstuvwxyz"
SPLIT_GAP_TOKENS = 80  # haystack tokens between a split needle's key phrase and its value


def passkey_cases(encode: Callable[[str], np.ndarray], length: int, num_cases: int, seed: int,
                  *, haystack: np.ndarray | None = None, key_digits: int = 5,
                  task: str = "passkey", num_needles: int = 8
                  ) -> list[data.RetrievalExample]:
    """`num_cases` prompts of exactly `length` tokens, the asked needle's depth evenly
    spaced over the history ((i + 0.5) / num_cases), keys and phrasings drawn from
    (seed, length). `task` (`PASSKEY_TASKS`): the passkey (`data.make_retrieval_example`)
    or a look-alike task (`lookalike_example`, with `num_needles` needles for the
    multikey ones)."""
    if num_cases < 1:
        raise EvalInputError(f"need at least one passkey case, got {num_cases}")
    if task not in PASSKEY_TASKS:
        raise EvalInputError(f"unknown passkey task {task!r}; choose from {PASSKEY_TASKS}")
    rng = np.random.default_rng([seed, length] + ([] if task == "passkey"
                                                   else [PASSKEY_TASKS.index(task)]))
    cases = []
    for i in range(num_cases):
        depth = (i + 0.5) / num_cases
        try:
            if task == "passkey":
                ex = data.make_retrieval_example(encode, length, rng, haystack=haystack,
                                                 depth=depth, key_digits=key_digits)
            else:
                ex = lookalike_example(encode, length, rng, task=task, haystack=haystack,
                                       depth=depth, num_needles=num_needles,
                                       value_digits=key_digits)
        except data.DataError as e:
            raise EvalInputError(f"cannot build a {task} case of {length} tokens: {e}") from e
        if len(ex.tokens) != length:
            raise EvalInputError(f"{task} case has {len(ex.tokens)} tokens, wanted {length}")
        cases.append(ex)
    return cases


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, n))


def lookalike_example(encode: Callable[[str], np.ndarray], length: int,
                      rng: np.random.Generator, *, task: str,
                      haystack: np.ndarray | None = None, depth: float = 0.5,
                      num_needles: int = 8, value_digits: int = 5) -> data.RetrievalExample:
    """One look-alike retrieval prompt of exactly `length` tokens (`PASSKEY_TASK_NOTES`):
    the haystack (real text from `haystack`, else filler) with needles inserted at token
    boundaries — the asked one at relative `depth`, the look-alikes at random depths —
    then the question. Each needle is encoded in pieces (text, value, text) so the
    answer's token span is known exactly (`answer_spans`); `key` is the asked value's
    digit string (what `metrics.score_passkey` looks for)."""
    def enc(text: str) -> np.ndarray:
        return np.asarray(encode(text), np.int32)

    def needle(before: str, value: str, after: str) -> tuple[list[np.ndarray], int]:
        parts = [enc(before), enc(value), enc(after)]
        return parts, 1  # index of the value piece

    values: list[str] = []
    needles: list[tuple[list[np.ndarray], int]] = []  # the asked needle first
    if task in ("multikey_word", "multikey_number", "near_duplicate"):
        if not 2 <= num_needles <= len(_KEY_WORDS):
            raise data.DataError(f"num_needles must lie in 2..{len(_KEY_WORDS)}, got "
                                 f"{num_needles}")
        if task == "multikey_word":
            keys = [str(k) for k in rng.choice(_KEY_WORDS, num_needles, replace=False)]
        elif task == "multikey_number":
            keys = []
            while len(keys) < num_needles:
                k = str(int(rng.integers(1_000_000, 10_000_000)))
                keys += [k] if k not in keys else []
        else:
            stem = "-".join(str(w) for w in rng.choice(_KEY_WORDS, 2, replace=False))
            letters = rng.choice(list(_NEAR_DUPLICATE_LETTERS), num_needles, replace=False)
            keys = [f"{stem}-{c}" for c in letters]
        while len(values) < num_needles:
            v = _digits(rng, value_digits)
            values += [v] if v not in values else []
        for k, v in zip(keys, values):
            needles.append(needle(f" The special magic number for {k} is ", v, ". "))
        question = (f"\nWhat is the special magic number for {keys[0]}? The special magic "
                    f"number for {keys[0]} is")
    elif task == "paraphrase":
        text, question = _PARAPHRASES[int(rng.integers(len(_PARAPHRASES)))]
        values = [_digits(rng, value_digits)]
        before, after = text.split("{v}")
        needles.append(needle(" " + before, values[0], after + " "))
        question = "\n" + question
    elif task == "split":
        k = str(rng.choice(_KEY_WORDS))
        values = [_digits(rng, value_digits)]
        needles.append(needle(f" The special magic number for {k} is written below, after a "
                              f"short digression.", "", ""))  # the gap goes after it
        question = (f"\nWhat is the special magic number for {k}? The special magic "
                    f"number for {k} is")
    else:
        raise data.DataError(f"unknown look-alike task {task!r}")
    q = enc(question)
    tail = [enc(" That number is "), enc(values[0]), enc(". ")] if task == "split" else []
    gap = SPLIT_GAP_TOKENS if task == "split" else 0
    used = sum(len(p) for parts, _ in needles for p in parts) + sum(map(len, tail)) + len(q)
    n_hay = length - used
    if n_hay <= gap + 2 * len(needles):
        raise data.DataError(f"{length} tokens are too short for {len(needles)} needles and "
                             f"the question")
    if haystack is None:
        unit = enc(data._FILLER)
        hay = np.tile(unit, n_hay // len(unit) + 1)[:n_hay]
    else:
        if len(haystack) < n_hay:
            raise data.DataError(f"haystack of {len(haystack)} tokens is shorter than {n_hay}")
        start = int(rng.integers(0, len(haystack) - n_hay + 1))
        hay = np.asarray(haystack[start: start + n_hay], np.int32)
    # insertion points in the haystack: the asked needle at `depth` (leaving room for a
    # split needle's gap), the look-alikes at distinct random points
    room = n_hay - gap
    at = [int(round(depth * room))]
    others = rng.permutation(room + 1)
    at += [int(x) for x in others if int(x) != at[0]][: len(needles) - 1]
    order = np.argsort(at, kind="stable")
    pieces, spans, pos, prev = [], [], 0, 0
    needle_span = (0, 0)
    for i in order:
        pieces.append(hay[prev:at[i]])
        pos += at[i] - prev
        prev = at[i]
        parts, vi = needles[i]
        start = pos
        for j, part in enumerate(parts):
            if i == 0 and j == vi and len(part):
                spans.append((pos, pos + len(part)))
            pieces.append(part)
            pos += len(part)
        if i == 0 and task == "split":  # the gap of haystack, then the value sentence
            pieces.append(hay[prev:prev + gap])
            pos += gap
            prev += gap
            for j, part in enumerate(tail):
                if j == 1:
                    spans.append((pos, pos + len(part)))
                pieces.append(part)
                pos += len(part)
        if i == 0:
            needle_span = (start, pos)
    pieces += [hay[prev:], q]
    tokens = np.concatenate(pieces).astype(np.int32)
    return data.RetrievalExample(tokens=tokens, answer=enc(" " + values[0]),
                                 needle_span=needle_span, key=values[0],
                                 answer_spans=tuple(spans))


def answer_positions(case: data.RetrievalExample, decode: Callable[[Sequence[int]], str]
                     ) -> list[np.ndarray]:
    """History positions of each occurrence of the answer: the case's `answer_spans`
    when it has them (look-alike tasks), else — the passkey, whose phrasings state the
    key once or twice — runs of consecutive needle tokens whose text holds a digit of
    the key (the phrasings hold no other digits); the whole needle span when none does. Focus recall asks whether one occurrence is wholly raw at the answer's
    start."""
    if case.answer_spans:
        return [np.arange(a, b, dtype=np.int64) for a, b in case.answer_spans]
    a, b = case.needle_span
    digit = [any(ch.isdigit() and ch in case.key for ch in decode([int(case.tokens[i])]))
             for i in range(a, b)]
    groups: list[list[int]] = []
    for i, d in enumerate(digit):
        if d and i and digit[i - 1]:
            groups[-1].append(a + i)
        elif d:
            groups.append([a + i])
    return [np.asarray(g, np.int64) for g in groups] or [np.arange(a, b, dtype=np.int64)]


def needle_blocks(span: Sequence[int], block_size: int) -> list[int]:
    """The blocks (token index // `block_size`) that hold any token of the history span
    [start, end), e.g. a case's `needle_span`; none for an empty span."""
    start, end = int(span[0]), int(span[1])
    return list(range(start // block_size, (end - 1) // block_size + 1)) if end > start else []


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
