"""MegaContext tree: append-only hierarchical store of the whole history (SPEC §2.3).

Levels: LOD0 holds the raw token ids (uint32); LODl (l = 1..num_levels) holds one gist per
aligned group of K = block_size entries of LOD(l-1), i.e. one per K**l tokens. Gists are
vectors in the base model's input-embedding space (width D), stored as
`MCConfig.gist_dtype`.

Appending (`MegaContextTree.append`) accepts any number of tokens. After LOD0 grows, each
level l gists exactly the blocks that just became complete: the children are rows
[count_l * K, (count_{l-1} // K) * K) of level l-1, so no block is ever gisted twice or
skipped. Tokens of the incomplete newest block wait in the *ingest buffer* (they are
represented at LOD0 only); LOD2 nodes appear once their K LOD1 children exist.

LOD1 children are the blocks' token embeddings or, with `GistConfig.input="hidden"`, the
frozen base model's read-pass hidden states (SPEC §2.3a; chunks of `read_chunk` tokens
aligned to the history start, see `BlockGister`); only the gists are stored.

Batching and compilation. `BlockGister` gists the new blocks of one level in calls of a
*fixed* number of blocks (`gist_batch`, zero-padded; default `default_gist_batch()`), so
`gist_blocks` compiles exactly once per tree (the level is a traced argument). A fixed batch is also what makes a tree
bit-identical however its stream was chunked: XLA's CPU dot emitter picks different
kernels (hence summation orders) for different row counts, so the same block gisted in a
batch of 1 and of 64 differs by ~1e-6, while inside one fixed batch shape a block's
result does not depend on its row. An append of m new blocks at a level costs
ceil(m / gist_batch) calls, dispatched back to back (asynchronously) and gathered once.
With the read pass the features themselves come from whole-chunk reads (chunks complete
when read) or cached steps (the open chunk; see `ChunkReader`), so a tree with
`GistConfig.input="hidden"` or retrieval keys is bit-identical for the same feeding and
equal to fp32 rounding however fed.

Backends, one interface (`LevelStore`): `MemoryLevelStore` (numpy, capacity doubling) and
`DiskLevelStore` (one `LOD{l}.ctx` file per level, format below, read through a memory
map). Choose with `MegaContextTree.in_memory(...)`, `.create(path, ...)`, `.open(path, ...)`.

On-disk format (little-endian, version 2), per level a file `LOD{l}.ctx`:

    offset size field
         0    4 magic 0x4D434354 ("MCCT" as a LE u32)
         4    2 version (2; 1 = before checksums)
         6    2 level
         8    2 block_size
        10    2 embedding_dim (values per row: 1 for LOD0 token ids, D for gists)
        12    2 dtype code (0=u32, 1=fp16, 2=bf16, 3=fp32)
        14    8 num_entries (u64)
        22   32 model name (utf-8, zero padded)
        54    2 G: rows per checksum group (about 4 KiB of rows, at least 16 rows)
        56    4 CRC32 of the rows after the last complete group (rows [G*floor(n/G), n))
        60    4 CRC32 of header bytes [0, 60)
        64      rows, packed, num_entries * embedding_dim * itemsize bytes

beside it `LOD{l}.crc`: one u32 CRC32 (zlib's) per complete group of G rows, in order
(4 * floor(n / G) bytes; `checksum_path`); the retrieval keys likewise in `KEYS.ctx` /
`KEYS.crc`. Plus `metadata.json` (configs, GistNet checkpoint id, gist batch, what LOD1
gists are made from — `gist_input` embeddings|hidden, `input_layer`, `read_chunk` —
per-level counts, `format_version`, and `checksum`: the CRC32 of the canonical JSON of
every other key; written atomically). Opening a store with a GistNet of another input (or
layer / read chunk when hidden) is a `MetadataError`, like a mismatched GistNet checkpoint
id. Version 1 had zero bytes at 54..64, no `.crc` files and no metadata checksum: such a
store still opens (a warning says it is unverified; headers, lengths, level counts and
token ids are checked) and appends keep it version 1 — readable rather than refused,
because session saves hold stores and an old save must stay loadable.

Integrity. Appends are O(new rows): the open group's CRC continues from the header's
(`zlib.crc32(new, old)`), each group the append completes gets its entry in the `.crc`
file. `open` (with `verify=True`, the default) reads every counted row back before
anything is used: token ids against the gister's vocabulary (`TokenRangeError`), then
each complete group against its `.crc` entry and the partial group against the header
(`RowChecksumError`, naming the file, the rows and their byte range); a damaged header is
`HeaderChecksumError`, a damaged metadata.json `MetadataChecksumError` (all
`ChecksumError`s). CRC32 detects every error of up to 32 consecutive bits, so one flipped
byte never passes. `open(verify=False)` skips this pass over the rows (headers, lengths,
counts and metadata.json are still checked). Checksums prove the bytes are those
written, nothing more: what a reader takes from the store after `open` is not
re-verified (a process holding the lock is the only writer). Cost per 1M tokens
(SmolLM2-135M, D=576 fp32): 12 kB of `.crc` (0.015% of 78 MB), +2.4% fsyncs when
streaming 32-token appends, ~0.1 s CPU, ~30-50 ms to verify on open.

Durability: an append writes the rows after the last counted entry and the checksums of
the groups it completes, fsyncs both, then rewrites the 64-byte header (count, partial
group CRC, header CRC: one write) and fsyncs again, level by level from LOD0 up.
metadata.json is rewritten (on create, open, flush, close) only after the level files
are fsynced, so its counts never exceed the headers'. A crash can thus leave (a) bytes
beyond the counted rows in a level file and entries beyond the complete groups in a
`.crc` file — a torn tail, trimmed on open; (b) a higher level (or the keys) behind its
children — on open those complete blocks are gisted again, so the reopened tree equals one
built from the recovered LOD0 prefix; (c) metadata.json counts below the headers' (a
stale copy: harmless). Everything else is an error, never a silent loss: a file shorter
than its header claims (`TruncatedFileError`), a header counting fewer entries than
metadata.json recorded (`LostEntriesError`), a level with more entries than its children
complete (`InconsistentLevelsError`), a checksum mismatch, any header field that disagrees
with the expected configuration (its own `StoreError` subclass). Opening changes no file
until every level, the keys and the metadata passed all of these checks; only then are
torn tails trimmed (`tree.recovered_bytes`) and lost gists made.

Device view: `MegaContextTree.view()` returns a `TreeView` of fixed-capacity device
arrays. Capacity per level is either fixed by `view_capacity_tokens` (level l holds
ceil(C / K**l) rows; exceeding it raises `TreeCapacityError`) or, by default, the next
power of two >= the entry count (at least `_MIN_VIEW_ROWS`), so a stream of T tokens
changes each level's shape at most log2(T) times (each change recompiles jitted consumers
once). Between growths, new rows are written into the existing arrays by one jitted
scatter per level with the row count padded to a power of two.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mcjax.config import GistConfig, LlamaConfig, MCConfig
from mcjax.gist import gist_blocks

__all__ = [
    "TreeView", "MegaContextTree", "AppendResult", "BlockGister", "append_to_trees",
    "LevelStore", "MemoryLevelStore", "DiskLevelStore",
    "StoreError", "MissingStoreFileError", "BadMagicError", "UnsupportedVersionError",
    "LevelMismatchError", "BlockSizeMismatchError", "EmbeddingDimMismatchError",
    "DtypeMismatchError", "ModelMismatchError", "TruncatedFileError", "CorruptHeaderError",
    "InconsistentLevelsError", "LostEntriesError", "MetadataError", "StoreExistsError",
    "StoreLockedError", "ChecksumError", "HeaderChecksumError", "RowChecksumError",
    "MetadataChecksumError", "TokenRangeError", "TreeInputError", "TreeCapacityError",
    "MAGIC", "FORMAT_VERSION", "READABLE_VERSIONS", "HEADER_SIZE", "DTYPE_CODES",
    "read_header", "level_filename", "checksum_path", "bytes_per_million_tokens",
    "checksum_bytes_per_million_tokens", "default_gist_batch",
]


# --------------------------------------------------------------------------- device view


@flax.struct.dataclass
class TreeView:
    """Device-side view of the tree for jitted gathers.

    Every level is a fixed-capacity array; rows at or beyond `counts[level]` are padding
    (zeros) and must never be read as content. A leading batch axis may be added (vmap).
    """

    tokens: jax.Array  # [C0] int32 LOD0 token ids
    gists: tuple[jax.Array, ...]  # gists[l - 1]: [C_l, D] gists of level l = 1..num_levels
    counts: jax.Array  # [num_levels + 1] int32 number of valid entries per level
    # [C1, width] retrieval keys per LOD1 block (`mcjax.retrieval`), or None (not kept);
    # valid rows: counts[1]
    keys: jax.Array | None = None

    @property
    def num_levels(self) -> int:
        return len(self.gists)

    def capacity(self, level: int) -> int:
        """Rows of the fixed-capacity array of `level` (0 = tokens)."""
        return self.tokens.shape[-1] if level == 0 else self.gists[level - 1].shape[-2]


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """An on-disk MegaContext store is missing, corrupt, or does not match the config."""


class MissingStoreFileError(StoreError, FileNotFoundError):
    """A file of the store does not exist."""


class StoreExistsError(StoreError, FileExistsError):
    """`create` was asked to write where a store already exists."""


class BadMagicError(StoreError):
    """The file does not start with the MCCT magic number."""


class UnsupportedVersionError(StoreError):
    """The file's format version is not one this code reads."""


class LevelMismatchError(StoreError):
    """The header's level is not the level of the file name."""


class BlockSizeMismatchError(StoreError):
    """The header's block size differs from the configured one."""


class EmbeddingDimMismatchError(StoreError):
    """The header's embedding dim differs from the expected row width."""


class DtypeMismatchError(StoreError):
    """The header's dtype code is unknown or differs from the expected dtype."""


class ModelMismatchError(StoreError):
    """The header's model name differs from the expected one."""


class TruncatedFileError(StoreError):
    """The file is shorter than its header (or than a header) says."""


class CorruptHeaderError(StoreError):
    """Reserved header bytes are not zero, or the model name is not valid utf-8."""


class StoreLockedError(StoreError):
    """Another open tree (this process or another) is writing the store."""


class InconsistentLevelsError(StoreError):
    """A level holds more entries than its children can account for."""


class LostEntriesError(InconsistentLevelsError):
    """A header counts fewer entries than metadata.json recorded: complete entries were
    lost (metadata counts are written only once the headers counting them are durable, so
    no crash can leave this)."""


class MetadataError(StoreError):
    """metadata.json is unreadable or disagrees with the expected configuration."""


class ChecksumError(StoreError):
    """Bytes of the store differ from what was written: they do not match the checksum
    written with them (the message names the file and the byte range)."""


class HeaderChecksumError(ChecksumError):
    """A level file's 64-byte header does not match its header checksum."""


class RowChecksumError(ChecksumError):
    """A group of rows does not match its checksum (in the `.crc` file beside the level
    file, or the partial last group's in the header). `path`, `rows` (start, stop) and
    `byte_range` (start, stop) in the level file name the damaged span; the damaged byte
    is in those rows or in their checksum."""

    def __init__(self, message: str, path: Path, rows: tuple[int, int],
                 byte_range: tuple[int, int]):
        super().__init__(message)
        self.path, self.rows, self.byte_range = path, rows, byte_range


class MetadataChecksumError(ChecksumError, MetadataError):
    """metadata.json's content does not match its recorded checksum."""


class TokenRangeError(StoreError):
    """LOD0 holds a token id outside the vocabulary of the gister's base model."""


class TreeInputError(ValueError):
    """Tokens given to `append` are not a 1-D array of in-range integer ids."""


class TreeCapacityError(RuntimeError):
    """The fixed view capacity cannot hold the tree."""


# --------------------------------------------------------------------------- format

MAGIC = 0x4D434354
FORMAT_VERSION = 2  # 2: checksums (header, row groups, metadata.json); 1: none
READABLE_VERSIONS = (1, 2)
HEADER_SIZE = 64
_HEADER = struct.Struct("<IHHHHHQ32s")  # 54 bytes; version 2 adds _HEADER_SUMS, 1 zeros
_HEADER_SUMS = struct.Struct("<HI")  # at 54: rows per checksum group, partial group's CRC
_HEADER_CRC_OFFSET = 60  # u32 CRC32 of header bytes [0, 60)
_MODEL_NAME_BYTES = 32
_CRC_GROUP_BYTES = 4096  # a checksum covers about this many bytes of rows ...
_CRC_MIN_GROUP_ROWS = 16  # ... and at least this many rows (one .crc fsync per 16 appends)
CHECKSUM_SUFFIX = ".crc"
DTYPE_CODES = {0: np.dtype(np.uint32), 1: np.dtype(np.float16),
               2: np.dtype(ml_dtypes.bfloat16), 3: np.dtype(np.float32)}
_CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
_GIST_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_METADATA = "metadata.json"
KEYS_LEVEL = 0xFF  # header level code of the retrieval-keys file (one row per LOD1 block)
KEYS_FILENAME = "KEYS.ctx"
_FORMAT_NAME = "mcjax.megacontext"
_MIN_VIEW_ROWS = 64


def level_filename(level: int) -> str:
    return f"LOD{level}.ctx"


def checksum_path(path: str | os.PathLike) -> Path:
    """The checksum file beside a level file: `LOD1.ctx` -> `LOD1.crc`."""
    return Path(path).with_suffix(CHECKSUM_SUFFIX)


def _group_rows(row_bytes: int) -> int:
    """Rows per checksum group: about `_CRC_GROUP_BYTES` of rows, at least
    `_CRC_MIN_GROUP_ROWS` (a completed group costs an fsync of the `.crc` file; streaming
    appends one gist row per block, so a group of one 2 KiB gist row would double LOD1's
    fsyncs)."""
    return max(_CRC_MIN_GROUP_ROWS, min(0xFFFF, _CRC_GROUP_BYTES // row_bytes))


def _encode_model_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > _MODEL_NAME_BYTES:
        raise ValueError(f"model name {name!r} is {len(raw)} bytes in utf-8; the header "
                         f"holds at most {_MODEL_NAME_BYTES}")
    return raw.ljust(_MODEL_NAME_BYTES, b"\0")


def _pack_header(level: int, block_size: int, dim: int, dtype: np.dtype, count: int,
                 model_name: str, *, version: int = FORMAT_VERSION, group_rows: int = 0,
                 tail_crc: int = 0) -> bytes:
    head = _HEADER.pack(MAGIC, version, level, block_size, dim, _CODE_OF[dtype],
                        count, _encode_model_name(model_name))
    if version == 1:
        return head + b"\0" * (HEADER_SIZE - len(head))
    head += _HEADER_SUMS.pack(group_rows, tail_crc)
    return head + struct.pack("<I", zlib.crc32(head))


@dataclasses.dataclass(frozen=True)
class Header:
    magic: int
    version: int
    level: int
    block_size: int
    embedding_dim: int
    dtype_code: int
    num_entries: int
    model_name: str
    group_rows: int = 0  # version 2: rows per checksum group
    tail_crc: int = 0  # version 2: CRC32 of the rows after the last complete group


def read_header(path: str | os.PathLike) -> Header:
    """Parse a `.ctx` header without validating it against any configuration (magic,
    version and — version 2 — the header checksum are checked)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise TruncatedFileError(f"{path}: {len(raw)} bytes, shorter than the "
                                 f"{HEADER_SIZE}-byte header")
    magic, version, level, bs, dim, code, n, name = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise BadMagicError(f"{path}: magic is 0x{magic:08X}, expected 0x{MAGIC:08X} "
                            f"('MCCT'); not a MegaContext level file")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(f"{path}: format version {version}, this code reads "
                                      f"versions {'/'.join(map(str, READABLE_VERSIONS))}")
    group_rows = tail_crc = 0
    if version == 1:
        if any(raw[_HEADER.size:]):
            raise CorruptHeaderError(f"{path}: reserved header bytes "
                                     f"{_HEADER.size}..{HEADER_SIZE} are not zero")
    else:
        (stored,) = struct.unpack_from("<I", raw, _HEADER_CRC_OFFSET)
        if zlib.crc32(raw[:_HEADER_CRC_OFFSET]) != stored:
            raise HeaderChecksumError(
                f"{path}: header bytes [0, {HEADER_SIZE}) do not match the header checksum "
                f"at byte {_HEADER_CRC_OFFSET}: the header is damaged (or was edited)")
        group_rows, tail_crc = _HEADER_SUMS.unpack_from(raw, _HEADER.size)
        if group_rows < 1:
            raise CorruptHeaderError(f"{path}: checksum group of {group_rows} rows")
    try:
        model_name = name.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptHeaderError(f"{path}: model name field is not utf-8: {name!r}") from e
    return Header(magic, version, level, bs, dim, code, n, model_name, group_rows, tail_crc)


# --------------------------------------------------------------------------- level stores


def _lock(fd: int, path: Path) -> None:
    """Exclusive advisory lock for the life of `fd`; the OS drops it when the writer dies."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        raise StoreLockedError(f"{path} is open for writing elsewhere (another tree holds "
                               f"its lock); close that tree first") from e


def _pwrite_all(fd: int, data, offset: int) -> None:
    data, written = memoryview(data), 0
    while written < len(data):  # pwrite may write less than asked
        written += os.pwrite(fd, data[written:], offset + written)


class LevelStore:
    """Append-only rows of one level: `[n, width]` of one dtype (width 1 for token ids)."""

    level: int
    dtype: np.dtype
    width: int

    def __len__(self) -> int:
        raise NotImplementedError

    def append(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an array [stop - start, width] (a copy)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width or rows.dtype != self.dtype:
            raise ValueError(f"LOD{self.level} rows must be [n, {self.width}] {self.dtype}, "
                             f"got {rows.shape} {rows.dtype}")
        return np.ascontiguousarray(rows)

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"LOD{self.level} rows [{start}, {stop}) out of range "
                             f"[0, {len(self)})")


class MemoryLevelStore(LevelStore):
    """Rows in a numpy buffer whose capacity doubles (amortised O(1) appends)."""

    def __init__(self, level: int, dtype: np.dtype, width: int):
        self.level, self.dtype, self.width = level, np.dtype(dtype), width
        self._buf = np.zeros((16, width), self.dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, rows: np.ndarray) -> None:
        rows = self._check_rows(rows)
        need = self._n + len(rows)
        if need > len(self._buf):
            grown = np.zeros((max(need, 2 * len(self._buf)), self.width), self.dtype)
            grown[:self._n] = self._buf[:self._n]
            self._buf = grown
        self._buf[self._n:need] = rows
        self._n = need

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        return self._buf[start:stop].copy()

    @property
    def nbytes(self) -> int:
        return self._n * self.width * self.dtype.itemsize


class DiskLevelStore(LevelStore):
    """One `LOD{l}.ctx` file (+ its `LOD{l}.crc` checksums, version 2): durable appends,
    memory-mapped reads, every row verified on open (module docstring)."""

    def __init__(self, path: Path, fd: int, level: int, dtype: np.dtype, width: int,
                 count: int, durable: bool, *, block_size: int, model_name: str,
                 version: int = FORMAT_VERSION, group_rows: int = 1, tail_crc: int = 0,
                 crc_fd: int = -1):
        self.path, self._fd, self._crc_fd = path, fd, crc_fd
        self.level, self.dtype, self.width = level, np.dtype(dtype), width
        self.block_size, self.model_name = block_size, model_name
        self.version, self.group_rows, self._tail_crc = version, group_rows, tail_crc
        self._n = count
        self.durable = durable
        self.truncated_bytes = 0  # torn-tail bytes of the level file removed on open
        self._torn: tuple[int, int] | None = None  # (file, .crc) lengths to trim to
        self._row_bytes = width * self.dtype.itemsize
        self._map: np.ndarray | None = None  # memory map of the first len(_map) rows

    @property
    def checksum_path(self) -> Path:
        return checksum_path(self.path)

    @classmethod
    def create(cls, path: Path, *, level: int, block_size: int, dtype: np.dtype, width: int,
               model_name: str, durable: bool = True) -> "DiskLevelStore":
        dtype = np.dtype(dtype)
        group = _group_rows(width * dtype.itemsize)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        crc_fd = -1
        try:
            _lock(fd, path)
            crc_fd = os.open(checksum_path(path), os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(crc_fd, 0)
            os.ftruncate(fd, 0)
            _pwrite_all(fd, _pack_header(level, block_size, width, dtype, 0, model_name,
                                         group_rows=group), 0)
            os.fsync(crc_fd)
            os.fsync(fd)
        except BaseException:
            for f in (fd, crc_fd):
                if f >= 0:
                    os.close(f)
            raise
        return cls(path, fd, level, dtype, width, 0, durable, block_size=block_size,
                   model_name=model_name, group_rows=group, crc_fd=crc_fd)

    @classmethod
    def open(cls, path: Path, *, level: int, block_size: int, dtype: np.dtype, width: int,
             model_name: str | None, durable: bool = True, verify: bool = True,
             vocab_size: int | None = None, version: int | None = None
             ) -> "DiskLevelStore":
        """Lock, validate the header against the expectation and (`verify`) every row
        against its checksum and, with `vocab_size`, every token id against the vocabulary;
        `version`, when given, is the version the file must have. Changes no byte of the
        file: a torn tail (bytes beyond the counted rows, checksums beyond their complete
        groups) is only noted, and trimmed by `trim_torn_tail()` — by the caller once all
        its checks passed, or by the first append."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise MissingStoreFileError(f"{path}: missing level file of the store") from e
        except IsADirectoryError as e:
            raise MissingStoreFileError(f"{path}: a directory, not a level file") from e
        crc_fd = -1
        try:
            _lock(fd, path)
            dtype = np.dtype(dtype)
            h = cls._validate(path, fd, level=level, block_size=block_size, dtype=dtype,
                              width=width, model_name=model_name)
            if version is not None and h.version != version:
                raise UnsupportedVersionError(
                    f"{path}: format version {h.version} in a store of version {version} "
                    f"(metadata.json): files of two versions never make one store")
            count, row_bytes = h.num_entries, width * dtype.itemsize
            want = HEADER_SIZE + count * row_bytes
            torn, crc_want = os.fstat(fd).st_size - want, 0
            if h.version >= 2:
                crc_file = checksum_path(path)
                try:
                    crc_fd = os.open(crc_file, os.O_RDWR)
                except (FileNotFoundError, IsADirectoryError) as e:
                    raise MissingStoreFileError(f"{crc_file}: missing checksum file of "
                                                f"{path.name}") from e
                crc_want = 4 * (count // h.group_rows)
                crc_size = os.fstat(crc_fd).st_size
                if crc_size < crc_want:  # checksums are durable before the count
                    raise TruncatedFileError(
                        f"{crc_file}: {crc_size} bytes, but {path.name} counts {count} rows "
                        f"in {count // h.group_rows} complete groups of {h.group_rows}, "
                        f"whose checksums take {crc_want} bytes")
                torn_crc = crc_size - crc_want
            else:
                torn_crc = 0
            store = cls(path, fd, level, dtype, width, count, durable, block_size=block_size,
                        model_name=h.model_name, version=h.version, group_rows=h.group_rows,
                        tail_crc=h.tail_crc, crc_fd=crc_fd)
            if torn > 0 or torn_crc > 0:  # written but never counted: a crash mid-append
                store._torn = (want, crc_want)
            if verify:
                store.verify(vocab_size=vocab_size)
        except BaseException:
            for f in (fd, crc_fd):
                if f >= 0:
                    os.close(f)
            raise
        return store

    @staticmethod
    def _validate(path: Path, fd: int, *, level: int, block_size: int, dtype: np.dtype,
                  width: int, model_name: str | None) -> Header:
        """Check every header field and the file length; returns the header."""
        h = read_header(path)
        if h.level != level:
            raise LevelMismatchError(f"{path}: header says level {h.level}, expected "
                                     f"{level} (file name {path.name})")
        if h.block_size != block_size:
            raise BlockSizeMismatchError(f"{path}: block_size {h.block_size} in the header, "
                                         f"configured block_size is {block_size}")
        if h.embedding_dim != width:
            raise EmbeddingDimMismatchError(f"{path}: embedding_dim {h.embedding_dim} in the "
                                            f"header, expected {width}")
        if h.dtype_code not in DTYPE_CODES:
            raise DtypeMismatchError(f"{path}: unknown dtype code {h.dtype_code} (known: "
                                     f"0=u32, 1=fp16, 2=bf16, 3=fp32)")
        if DTYPE_CODES[h.dtype_code] != dtype:
            raise DtypeMismatchError(f"{path}: header dtype {DTYPE_CODES[h.dtype_code].name} "
                                     f"(code {h.dtype_code}), expected {dtype.name} "
                                     f"(code {_CODE_OF[dtype]})")
        if model_name is not None and h.model_name != model_name:
            raise ModelMismatchError(f"{path}: written for model {h.model_name!r}, expected "
                                     f"{model_name!r}")
        row_bytes = width * dtype.itemsize
        size = os.fstat(fd).st_size
        want = HEADER_SIZE + h.num_entries * row_bytes
        if size < want:  # rows are made durable before the count: this is corruption
            raise TruncatedFileError(f"{path}: {size} bytes, but the header counts "
                                     f"{h.num_entries} entries of {row_bytes} bytes "
                                     f"({want} bytes with the header)")
        return h

    def verify(self, vocab_size: int | None = None) -> None:
        """Read every counted row back: token ids (LOD0, given `vocab_size`) inside the
        vocabulary, then (version 2) each complete group of rows against its checksum in
        the `.crc` file and the partial last group against the header's. Raises
        `TokenRangeError` / `RowChecksumError` naming the file and the rows and bytes."""
        self._require_open()
        n, rb = self._n, self._row_bytes
        body = (np.memmap(self.path, np.uint8, mode="r", offset=HEADER_SIZE,
                          shape=(n * rb,)) if n else np.zeros((0,), np.uint8))
        if vocab_size is not None and self.dtype == np.uint32 and self.width == 1:
            ids = body.view("<u4")
            bad = np.flatnonzero(ids >= vocab_size)
            if len(bad):
                i = int(bad[0])
                raise TokenRangeError(
                    f"{self.path}: token id {int(ids[i])} is outside the vocabulary "
                    f"[0, {vocab_size}) (row {i}, byte offset {HEADER_SIZE + 4 * i}; "
                    f"{len(bad)} such rows)")
        if self.version < 2:
            return
        G = self.group_rows
        full = n // G
        sums = np.frombuffer(os.pread(self._crc_fd, 4 * full, 0), "<u4")
        step = G * rb
        for g in range(full):
            if zlib.crc32(body[g * step:(g + 1) * step]) != sums[g]:
                self._mismatch(g * G, (g + 1) * G,
                               f"entry {g} at byte {4 * g} of {self.checksum_path.name}")
        if zlib.crc32(body[full * step:]) != self._tail_crc:
            self._mismatch(full * G, n, "the partial group's checksum in the header")

    def _mismatch(self, a: int, b: int, where: str) -> None:
        span = (HEADER_SIZE + a * self._row_bytes, HEADER_SIZE + b * self._row_bytes)
        raise RowChecksumError(
            f"{self.path}: rows [{a}, {b}) (bytes [{span[0]}, {span[1]})) do not match "
            f"their checksum ({where}): a byte of these rows or of the checksum is damaged",
            self.path, (a, b), span)

    def trim_torn_tail(self) -> int:
        """Remove bytes beyond the counted rows and checksums beyond their complete groups
        (a crash mid-append); returns the level file's bytes removed."""
        if self._torn is None:
            return 0
        self._require_open()
        want, crc_want = self._torn
        removed = os.fstat(self._fd).st_size - want
        os.ftruncate(self._fd, want)
        os.fsync(self._fd)
        if self._crc_fd >= 0:
            os.ftruncate(self._crc_fd, crc_want)
            os.fsync(self._crc_fd)
        self._torn = None
        self.truncated_bytes += max(0, removed)
        return removed

    def __len__(self) -> int:
        return self._n

    def append(self, rows: np.ndarray) -> None:
        """Rows, then the checksums of the groups they complete, are made durable before
        the header (count, partial group's checksum, header checksum: one 64-byte write)
        counts them."""
        rows = self._check_rows(rows)
        if len(rows) == 0:
            return
        self._require_open()
        self.trim_torn_tail()
        data = memoryview(rows.tobytes())
        n0, n1, rb = self._n, self._n + len(rows), self._row_bytes
        _pwrite_all(self._fd, data, HEADER_SIZE + n0 * rb)
        crc, sums = self._tail_crc, []
        if self.version >= 2:
            G, r = self.group_rows, n0
            while r < n1:  # continue the open group's CRC; O(new rows)
                end = min((r // G + 1) * G, n1)
                crc = zlib.crc32(data[(r - n0) * rb:(end - n0) * rb], crc)
                if end % G == 0:
                    sums.append(crc)
                    crc = 0
                r = end
            if sums:
                _pwrite_all(self._crc_fd, np.asarray(sums, "<u4").tobytes(), 4 * (n0 // G))
        if self.durable:
            os.fsync(self._fd)  # rows and checksums on disk before the header counts them
            if sums:
                os.fsync(self._crc_fd)
        _pwrite_all(self._fd, _pack_header(
            self.level, self.block_size, self.width, self.dtype, n1, self.model_name,
            version=self.version, group_rows=self.group_rows, tail_crc=crc), 0)
        if self.durable:
            os.fsync(self._fd)
        self._n, self._tail_crc = n1, crc

    def read(self, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        if start == stop:
            return np.zeros((0, self.width), self.dtype)
        self._require_open()
        if self._map is None or len(self._map) < stop:
            # Remap the whole counted range (a file that grew needs a new mapping).
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_SIZE,
                                  shape=(self._n, self.width))
        return np.array(self._map[start:stop])

    @property
    def nbytes(self) -> int:
        """Bytes of the level file (header + counted rows; the `.crc` file not included)."""
        return HEADER_SIZE + self._n * self._row_bytes

    @property
    def checksum_nbytes(self) -> int:
        """Bytes of the `.crc` file (4 per complete group of `group_rows` rows)."""
        return 4 * (self._n // self.group_rows) if self.version >= 2 else 0

    def flush(self) -> None:
        self._require_open()
        os.fsync(self._fd)
        if self._crc_fd >= 0:
            os.fsync(self._crc_fd)

    def close(self) -> None:
        for name in ("_crc_fd", "_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.fsync(fd)
                os.close(fd)
                setattr(self, name, -1)
        self._map = None

    def _require_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")


# --------------------------------------------------------------------------- gisting


READ_MODE = "chunks+kv-steps"  # how the read pass runs (metadata.json "read"; ChunkReader)


@dataclasses.dataclass
class ReadState:
    """One tree's read of its open chunk (`ChunkReader`): `cache` holds the first `filled`
    tokens of chunk `chunk` (-1: nothing yet)."""

    chunk: int = -1
    filled: int = 0
    cache: Any = None


class ChunkReader:
    """The tree's one read pass of new tokens (SPEC §2.3a): chunks of R = `chunk` tokens
    aligned to the history start, each read independently (causal, positions 0..R-1), as
    `base.model.read_pass_core` reads them, in one forward as deep as the deepest output:
    GistNet's input ("hidden", after `hidden_layer` layers) and the retrieval keys
    ("keys", pre-RoPE at `qk_layers`) come from the same forward, so a history token goes
    through the base model once whatever the tree keeps.

    * A chunk that is complete when its read begins is read whole: one R-token forward
      (`whole`), as fast as bulk reading gets.
    * Any other chunk (the history ended inside it when its read began) is read a
      segment at a time — segments cut at every block (K) and chunk (R) boundary of the
      history — each one `step`
      (`read_step_core`) over a KV cache of the chunk's earlier tokens kept in the tree's
      `ReadState`, up to and including the block that completes it (reading it whole
      then would read its earlier tokens twice). So streaming reads each new token once
      (re-reading the chunk's prefix per block cost R/K x the work).

    Such a chunk is always read by steps from its start, so its cache — and every
    output read over it — depends only on history positions: a state that does not hold
    the chunk's earlier tokens (a tree reopened from disk, a copy, no state given) is
    rebuilt by replaying them through the same steps, to the same bits. A token's features
    therefore depend on whether its chunk was complete when its read began: whole or in
    pieces, trees agree to fp32 rounding (the two paths are the same arithmetic in other
    shapes), and bit for bit for the same feeding. `calls` counts forwards (steps and
    whole chunks), `tokens_read` the tokens they read (replays included); each token read
    costs `depth` decoder-layer passes."""

    def __init__(self, step: Callable, new_cache: Callable[[], Any], whole: Callable, *,
                 chunk: int, block_size: int, hidden_layer: int | None = None,
                 qk_layers: Sequence[int] = ()):
        if chunk < 1 or block_size < 1:
            raise ValueError(f"chunk and block_size must be >= 1, got {chunk}, {block_size}")
        qk = tuple(int(x) for x in qk_layers)
        if hidden_layer is None and not qk:
            raise ValueError("a reader reads hidden states (hidden_layer) or keys (qk_layers)")
        self.step, self.new_cache, self.whole = step, new_cache, whole
        self.chunk, self.block_size = int(chunk), int(block_size)
        self.hidden_layer, self.qk_layers = hidden_layer, qk
        self.outputs = (("hidden",) if hidden_layer is not None else ()) + \
            (("keys",) if qk else ())
        self.calls = 0
        self.tokens_read = 0

    @property
    def depth(self) -> int:
        """Decoder layers one read runs through (each token read passes through them once)."""
        from mcjax.base.model import read_depth
        return read_depth(self.hidden_layer, self.qk_layers)

    @classmethod
    def from_base(cls, base_params: Any, base_config: LlamaConfig, *, chunk: int,
                  block_size: int, hidden_layer: int | None = None,
                  qk_layers: Sequence[int] = ()) -> "ChunkReader":
        """A reader of the frozen base model: "hidden" after `hidden_layer` layers and/or
        pre-RoPE "keys" at the 0-based `qk_layers`, one forward for both."""
        from mcjax.base.model import init_read_cache, read_pass_core, read_step_core

        qk = tuple(int(x) for x in qk_layers)
        keep = (("hidden",) if hidden_layer is not None else ()) + (("keys",) if qk else ())

        def step(params, cache, ids, index):
            out, cache = read_step_core(params, base_config, cache, ids, index,
                                        hidden_layer=hidden_layer, qk_layers=qk)
            return {k: out[k] for k in keep}, cache

        def whole(params, ids):
            out = read_pass_core(params, base_config, ids, chunk=chunk,
                                 hidden_layer=hidden_layer, qk_layers=qk)
            return {k: out[k] for k in keep}

        step, whole = jax.jit(step, donate_argnums=1), jax.jit(whole)
        return cls(lambda cache, ids, index: step(base_params, cache, ids, index),
                   lambda: init_read_cache(base_config, chunk, hidden_layer, qk),
                   lambda ids: whole(base_params, ids),
                   chunk=chunk, block_size=block_size, hidden_layer=hidden_layer,
                   qk_layers=qk)

    def segments(self, start: int, stop: int):
        """(a, b) pieces of history positions [start, stop), cut at multiples of K and R."""
        K, R = self.block_size, self.chunk
        a = start
        while a < stop:
            b = min(stop, (a // K + 1) * K, (a // R + 1) * R)
            yield a, b
            a = b

    def chunk_start(self, offset: int) -> int:
        return (offset // self.chunk) * self.chunk

    def read(self, ids: np.ndarray, first: int, new: int, state: ReadState | None = None
             ) -> dict[str, np.ndarray]:
        """{output: [len(ids) - (new - first), ...] float32} of history tokens [new, first +
        len(ids)) for each of `outputs`; `ids` are the history's tokens from position
        `first` = `chunk_start(new)` on (what the cache of `new`'s chunk must hold before
        them)."""
        ids = np.asarray(ids, np.int32)
        R = self.chunk
        stop = first + len(ids)
        if first != self.chunk_start(new) or not first <= new <= stop:
            raise ValueError(f"ids must start at the chunk start {self.chunk_start(new)} of "
                             f"position {new}, got start {first} for positions up to {stop}")
        state = ReadState() if state is None else state
        outs: list[dict] = []
        for cs in range(first, stop, R):
            ce, a = min(cs + R, stop), max(new, cs)
            piece = ids[cs - first:ce - first]
            if ce - cs == R and a == cs:  # a complete chunk, none of it read before: whole
                out = self.whole(jnp.asarray(piece[None]))
                self.calls += 1
                self.tokens_read += R
                outs.append({k: v[0, a - cs:] for k, v in out.items()})
                if state.chunk == cs // R:
                    state.chunk, state.filled, state.cache = -1, 0, None
                continue
            if (state.chunk, state.filled) != (cs // R, a - cs) or state.cache is None:
                state.chunk, state.filled, state.cache = cs // R, 0, None  # replay the prefix
                for x, y in self.segments(cs, a):
                    self._step(state, piece[x - cs:y - cs], x)
            outs += [{k: v[0] for k, v in self._step(state, piece[x - cs:y - cs], x).items()}
                     for x, y in self.segments(a, ce)]
            if ce - cs == R:  # the chunk is complete: no later read continues it
                state.chunk, state.filled, state.cache = -1, 0, None
        if not outs:
            return {k: np.zeros((0,), np.float32) for k in self.outputs}
        return {k: np.concatenate([np.asarray(o[k], np.float32) for o in outs])
                for k in self.outputs}

    def _step(self, state: ReadState, ids: np.ndarray, position: int) -> dict:
        index = position % self.chunk
        if index == 0 or state.cache is None:
            state.chunk, state.filled, state.cache = position // self.chunk, 0, self.new_cache()
        out, state.cache = self.step(state.cache, jnp.asarray(ids[None]), jnp.int32(index))
        state.filled = index + len(ids)
        self.calls += 1
        self.tokens_read += len(ids)
        return out


def default_gist_batch() -> int:
    """Blocks per gist call when none is given. On CPU a block costs about the same in any
    batch of >= 4 (measured at SmolLM2 width: ~18 ms/block alone, ~10-11 ms in batches of
    4-64), so 4 keeps streaming (one block per append, padded to the batch) cheap; on an
    accelerator one call's latency hardly depends on the batch, so bulk ingestion wants
    bigger batches."""
    return 4 if jax.default_backend() == "cpu" else 32


class BlockGister:
    """Gists complete blocks for a tree in fixed-size batches (see the module docstring),
    and hosts the tree's read pass (`reader`, a `ChunkReader`: one forward per chunk for
    everything the tree keeps).

    LOD1 children (`GistConfig.input`):
    * "embeddings": `embed_fn(ids[G, K] int32) -> [G, K, D]` maps LOD0 ids to the base
      model's token embeddings.
    * "hidden": the read pass (SPEC §2.3a): the base model's hidden states after
      `input_layer` layers, in chunks of R = `read_chunk` tokens aligned to the history
      start — token t's features are those of position t % R of chunk t // R, what
      `layer_hidden(..., chunk=R)` of the whole history gives (up to rounding). The tree
      reads its new complete blocks once (`read_blocks`, with its `ReadState` — the open
      chunk's KV cache — and the tokens from the chunk's start) and hands the hidden
      states to `block_inputs`: complete chunks are read whole, the open chunk by cached
      steps (features equal to rounding however the stream was chunked, bit-identical
      for the same chunking). Hidden states are transient: only gists are stored.

    With `retrieval` (a `RetrievalConfig`), the same read also yields the retrieval keys
    the tree stores (`retrieval.BlockKeys`): one chunk size (`read_chunk` =
    `retrieval.chunk`), one forward as deep as the deepest layer either needs.

    Use `BlockGister.from_base` to build both from the frozen base model.
    """

    def __init__(self, gist_cfg: GistConfig, gist_params: Any,
                 embed_fn: Callable[[jax.Array], jax.Array] | None, *, embed_dim: int,
                 block_size: int, vocab_size: int | None = None,
                 gist_batch: int | None = None, reader: ChunkReader | None = None):
        gist_batch = default_gist_batch() if gist_batch is None else gist_batch
        if gist_batch < 1:
            raise ValueError(f"gist_batch must be >= 1, got {gist_batch}")
        d_params = gist_params["out_proj"]["kernel"].shape[-1]
        if d_params != embed_dim:
            raise ValueError(f"GistNet params output width {d_params}, but embed_dim is "
                             f"{embed_dim}")
        if reader is not None and reader.block_size != block_size:
            raise ValueError(f"the reader reads blocks of {reader.block_size}, the tree's "
                             f"are {block_size}")
        if gist_cfg.input == "hidden":
            if reader is None or reader.hidden_layer is None:
                raise ValueError("GistConfig.input='hidden' gists the base model's read-pass "
                                 "hidden states: pass a reader of them (or use "
                                 "BlockGister.from_base)")
            if (reader.chunk, reader.hidden_layer) != (gist_cfg.read_chunk,
                                                       gist_cfg.input_layer):
                raise ValueError(f"the reader reads hidden states after {reader.hidden_layer} "
                                 f"layers in chunks of {reader.chunk}; this GistNet wants "
                                 f"input_layer {gist_cfg.input_layer}, read_chunk "
                                 f"{gist_cfg.read_chunk}")
        elif embed_fn is None:
            raise ValueError("GistConfig.input='embeddings' needs embed_fn")
        self.cfg, self.params, self.embed_fn, self.reader = gist_cfg, gist_params, embed_fn, \
            reader
        self.embed_dim, self.block_size = embed_dim, block_size
        self.vocab_size, self.gist_batch = vocab_size, gist_batch
        self._embed_checked = False
        self.calls = 0  # GistNet calls (of gist_batch blocks) so far, every tree's

    @property
    def read_calls(self) -> int:
        """Read-pass forwards so far (steps of at most K tokens and whole chunks)."""
        return 0 if self.reader is None else self.reader.calls

    @classmethod
    def from_base(cls, gist_cfg: GistConfig, gist_params: Any, base_params: Any,
                  base_config: LlamaConfig, *, block_size: int,
                  gist_batch: int | None = None, retrieval: Any = None) -> "BlockGister":
        """LOD1 children from the frozen base model: its token embeddings
        (`embed_tokens`) or, for `gist_cfg.input == "hidden"`, its read-pass hidden states
        after `gist_cfg.input_layer` layers. With `retrieval` (a `RetrievalConfig`) the
        read pass also reads the retrieval keys at `retrieval.layers` — the same forward,
        so both need one chunk size."""
        from mcjax.base.model import embed_tokens

        embed = jax.jit(embed_tokens)  # params are an argument, not baked-in constants
        hidden = gist_cfg.input == "hidden"
        if hidden and gist_cfg.input_layer > base_config.num_layers:
            raise ValueError(f"GistConfig.input_layer={gist_cfg.input_layer}, but the base "
                             f"model has only {base_config.num_layers} decoder layers")
        qk: tuple[int, ...] = ()
        chunk = gist_cfg.read_chunk
        if retrieval is not None:
            qk = tuple(int(x) for x in retrieval.layers)
            if max(qk) >= base_config.num_layers:
                raise ValueError(f"retrieval.layers {qk} exceed the base model's "
                                 f"{base_config.num_layers} layers")
            if hidden and retrieval.chunk != gist_cfg.read_chunk:
                raise ValueError(
                    f"one read pass gives GistNet's hidden states and the retrieval keys, "
                    f"so they need one chunk size: GistConfig.read_chunk is "
                    f"{gist_cfg.read_chunk}, RetrievalConfig.chunk {retrieval.chunk}")
            chunk = retrieval.chunk
        reader = None
        if hidden or qk:
            reader = ChunkReader.from_base(base_params, base_config, chunk=chunk,
                                           block_size=block_size,
                                           hidden_layer=gist_cfg.input_layer if hidden else None,
                                           qk_layers=qk)
        return cls(gist_cfg, gist_params, lambda ids: embed(base_params, ids),
                   embed_dim=base_config.hidden_size, block_size=block_size,
                   vocab_size=base_config.vocab_size, gist_batch=gist_batch, reader=reader)

    @property
    def input(self) -> str:
        return self.cfg.input

    def input_signature(self) -> dict:
        """What LOD1 gists are made from (recorded in an on-disk store's metadata.json)."""
        sig = {"gist_input": self.cfg.input}
        if self.cfg.input == "hidden":
            sig.update(input_layer=self.cfg.input_layer, read_chunk=self.cfg.read_chunk)
        return sig

    def context_start(self, offset: int) -> int:
        """First token the read of a block starting at token `offset` depends on: the
        start of its read chunk (a tree with a read pass), else the block itself."""
        if self.reader is not None:
            return self.reader.chunk_start(offset)
        return offset

    def read_blocks(self, ids: np.ndarray, *, context: np.ndarray | None = None,
                    context_at: int = 0, state: ReadState | None = None
                    ) -> dict[str, np.ndarray]:
        """The read pass of new complete blocks' tokens `ids` [m*K]: {"hidden": [m*K, D]}
        and/or {"keys": [m*K, layers, kv_heads, head_dim]} float32 (the reader's
        `outputs`), one forward for both. `context` holds the token ids from the start of
        the first block's read chunk up to that block (`context_start`; fewer than a
        chunk) starting at history position `context_at`, `state` the tree's `ReadState`
        (None: rebuilt from `context`)."""
        if self.reader is None:
            return {}
        R = self.reader.chunk
        ids = np.asarray(ids, np.int32)
        ctx = np.zeros((0,), np.int32) if context is None else np.asarray(context, np.int32)
        if ctx.ndim != 1 or len(ctx) >= R or context_at % R:
            raise ValueError(f"context must be the < read chunk={R} token ids from the start "
                             f"of the first block's read chunk, got shape {ctx.shape} at "
                             f"history position {context_at}")
        out = self.reader.read(np.concatenate([ctx, ids]), context_at,
                               context_at + len(ctx), state)
        if "hidden" in out and out["hidden"].shape != (len(ids), self.embed_dim):
            raise ValueError(f"the reader returned hidden states {out['hidden'].shape} for "
                             f"{len(ids)} tokens; expected {(len(ids), self.embed_dim)}")
        return out

    def __call__(self, level: int, children: np.ndarray, out_dtype: np.dtype, *,
                 context: np.ndarray | None = None, read_state: ReadState | None = None,
                 context_at: int = 0) -> np.ndarray:
        """children: [m*K] token ids (level 1) or [m*K, D] gists of level-1 -> [m, D]
        (the read pass, if GistNet reads hidden states, then GistNet; arguments as
        `read_blocks`, ignored for "embeddings" and above level 1)."""
        features = None
        if level == 1 and self.cfg.input == "hidden":
            m = len(children) // self.block_size
            features = self.read_blocks(np.asarray(children)[: m * self.block_size],
                                        context=context, context_at=context_at,
                                        state=read_state)["hidden"]
        inputs = self.block_inputs(level, children, features=features)
        return self.gist_inputs(level, [inputs], out_dtype)[0]

    def block_inputs(self, level: int, children: np.ndarray, *,
                     features: np.ndarray | None = None) -> np.ndarray:
        """What GistNet reads for the m = len(children) // K new blocks: [m, K] int32
        token ids (level 1, "embeddings": embedded per call), else [m, K, D] float32 (the
        read pass's hidden states `features` [m*K, D] at level 1 — `read_blocks` — and the
        child gists above). GistNet runs in `gist_inputs`."""
        K, D = self.block_size, self.embed_dim
        m = len(children) // K
        if level == 1 and self.cfg.input == "hidden":
            if m == 0:
                return np.zeros((0, K, D), np.float32)
            if features is None or len(features) != m * K:
                raise ValueError(f"GistNet reads hidden states: pass the read pass's features "
                                 f"of the {m * K} tokens (read_blocks), got "
                                 f"{None if features is None else np.shape(features)}")
            return np.asarray(features, np.float32).reshape(m, K, D)
        if level == 1:
            return np.asarray(children)[: m * K].reshape(m, K).astype(np.int32)
        return np.asarray(children)[: m * K].reshape(m, K, D).astype(np.float32)

    def gist_inputs(self, level: int, inputs: Sequence[np.ndarray], out_dtype: np.dtype
                    ) -> list[np.ndarray]:
        """Gist several trees' new blocks of one level together: `inputs` are
        `block_inputs` results, concatenated into calls of `gist_batch` blocks (the last
        one zero-padded), so B streams with one new block each cost one call, not B. A
        block's gist does not depend on its row inside the fixed batch shape (module
        docstring), so this equals gisting each tree's blocks alone, bit for bit.
        Returns one [m_i, D] array per input, in `out_dtype`."""
        G, jdtype = self.gist_batch, jnp.dtype(out_dtype)
        sizes = [len(x) for x in inputs]
        m = sum(sizes)
        if m == 0:
            return [np.zeros((0, self.embed_dim), out_dtype) for _ in inputs]
        blocks = np.concatenate([x for x in inputs if len(x)])
        padded = -(-m // G) * G
        if padded != m:  # zero-pad to whole batches; the padding's gists are dropped
            blocks = np.concatenate([blocks, np.zeros((padded - m,) + blocks.shape[1:],
                                                      blocks.dtype)])
        outs = []
        for i in range(0, padded, G):  # async dispatch: calls queue back to back
            chunk = blocks[i:i + G]
            if level == 1 and self.cfg.input == "embeddings":
                chunk = self._embed(chunk)
            outs.append(gist_blocks(self.params, self.cfg, jnp.asarray(chunk, jnp.float32),
                                    level).astype(jdtype))
        self.calls += len(outs)
        gists = np.concatenate([np.asarray(o) for o in outs])[:m].astype(out_dtype, copy=False)
        return np.split(gists, np.cumsum(sizes)[:-1])

    def _embed(self, ids: np.ndarray) -> jax.Array:
        emb = self.embed_fn(jnp.asarray(ids))
        if not self._embed_checked:
            want = ids.shape + (self.embed_dim,)
            if tuple(emb.shape) != want or not jnp.issubdtype(emb.dtype, jnp.floating):
                raise ValueError(f"embed_fn returned {emb.shape} {emb.dtype} for ids "
                                 f"{ids.shape}; expected floating {want}")
            self._embed_checked = True
        return emb.astype(jnp.float32)


# --------------------------------------------------------------------------- the tree


@dataclasses.dataclass(frozen=True)
class AppendResult:
    """What one `append` added: `new_nodes[l] = (start, stop)` entries of level l."""

    num_tokens: int
    new_nodes: tuple[tuple[int, int], ...]


@dataclasses.dataclass
class TreeStats:
    blocks_gisted: list[int]  # per level 1..L (index 0 unused, always 0)
    gist_calls: int = 0  # GistNet calls that gisted this tree's blocks (a call shared with
    # other trees, `append_to_trees`, counts for each; `BlockGister.calls` counts calls)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@jax.jit
def _write_rows(buf: jax.Array, rows: jax.Array, start: jax.Array, n: jax.Array) -> jax.Array:
    """buf[start : start + n] = rows[:n]; padded rows (index >= n) are dropped."""
    i = jnp.arange(rows.shape[0])
    idx = jnp.where(i < n, start + i, buf.shape[0])  # out of bounds -> dropped
    return buf.at[idx].set(rows.astype(buf.dtype), mode="drop")


class MegaContextTree:
    """The MegaContext tree over one stream (module docstring). Not thread-safe."""

    def __init__(self, stores: Sequence[LevelStore], mc: MCConfig, gister: BlockGister, *,
                 path: Path | None = None, metadata: dict | None = None,
                 view_capacity_tokens: int | None = None, block_keys: Any = None,
                 key_store: LevelStore | None = None):
        if (block_keys is None) != (key_store is None):
            raise ValueError("block_keys and key_store come together (retrieval keys)")
        if block_keys is not None:
            _check_reads_keys(gister, block_keys)
        if len(stores) != mc.num_levels + 1:
            raise ValueError(f"need {mc.num_levels + 1} level stores, got {len(stores)}")
        if gister.block_size != mc.block_size:
            raise ValueError(f"gister block_size {gister.block_size} != mc.block_size "
                             f"{mc.block_size}")
        if mc.num_levels > gister.cfg.max_level:
            raise ValueError(f"mc.num_levels={mc.num_levels} exceeds GistConfig.max_level="
                             f"{gister.cfg.max_level} (rows of the level embedding)")
        if view_capacity_tokens is not None and view_capacity_tokens < 1:
            raise ValueError(f"view_capacity_tokens must be >= 1, got {view_capacity_tokens}")
        self.mc, self.gister = mc, gister
        self.block_keys, self.key_store = block_keys, key_store
        self._keys_view: jax.Array | None = None
        self._keys_synced = 0
        self.stores = list(stores)
        self.path = path
        self._metadata = metadata
        self._metadata_written: dict | None = None  # what metadata.json holds now
        self.view_capacity_tokens = view_capacity_tokens
        self.stats = TreeStats([0] * (mc.num_levels + 1))
        self._view_arrays: list[jax.Array | None] = [None] * (mc.num_levels + 1)
        self._view_synced = [0] * (mc.num_levels + 1)
        self._closed = False
        # the read pass's KV cache of the open chunk: rebuilt on the first append when the
        # tree was opened or copied
        self._read_state = ReadState()
        self._read = None  # (first block, read-pass outputs) of blocks read, not yet used
        _check_level_counts(self.stores, key_store, mc.block_size, path)
        self._gist_complete_blocks()  # after a crash: gist blocks whose gists were lost

    # ------------------------------------------------------------------ construction

    @classmethod
    def in_memory(cls, mc: MCConfig, gister: BlockGister, *,
                  view_capacity_tokens: int | None = None, block_keys: Any = None
                  ) -> "MegaContextTree":
        """`block_keys` (a `mcjax.retrieval.BlockKeys`): also keep retrieval keys (read by
        the gister's read pass, built with `BlockGister.from_base(..., retrieval=rc)`)."""
        stores = [MemoryLevelStore(0, np.uint32, 1)] + [
            MemoryLevelStore(l, _GIST_DTYPES[mc.gist_dtype], gister.embed_dim)
            for l in range(1, mc.num_levels + 1)]
        key_store = (None if block_keys is None else
                     MemoryLevelStore(KEYS_LEVEL, block_keys.dtype, block_keys.width))
        return cls(stores, mc, gister, view_capacity_tokens=view_capacity_tokens,
                   block_keys=block_keys, key_store=key_store)

    @classmethod
    def create(cls, path: str | os.PathLike, mc: MCConfig, gister: BlockGister, *,
               model_name: str = "", gist_checkpoint_id: str = "", overwrite: bool = False,
               durable: bool = True, view_capacity_tokens: int | None = None,
               block_keys: Any = None) -> "MegaContextTree":
        """A new, empty on-disk store in directory `path` (created if needed); with
        `block_keys`, retrieval keys go to `KEYS.ctx` beside the level files."""
        path = Path(path)
        _encode_model_name(model_name)  # fail before touching the disk
        if gister.embed_dim > 0xFFFF or mc.block_size > 0xFFFF:
            raise ValueError("embedding_dim and block_size must fit in a u16")
        if block_keys is not None and block_keys.width > 0xFFFF:
            raise ValueError(f"retrieval key rows of {block_keys.width} values do not fit the "
                             f"header's u16 width field")
        path.mkdir(parents=True, exist_ok=True)
        if (path / _METADATA).exists() and not overwrite:
            raise StoreExistsError(f"{path} already holds a MegaContext store "
                                   f"(pass overwrite=True to replace it)")
        stores: list[DiskLevelStore] = []
        try:
            for l, dt, w in cls._level_layout(mc, gister):
                stores.append(DiskLevelStore.create(
                    path / level_filename(l), level=l, block_size=mc.block_size, dtype=dt,
                    width=w, model_name=model_name, durable=durable))
                if l == 0:  # we hold the lock now; until metadata is rewritten, the
                    (path / _METADATA).unlink(missing_ok=True)  # store is unopenable
            key_store = None
            if block_keys is not None:
                key_store = DiskLevelStore.create(
                    path / KEYS_FILENAME, level=KEYS_LEVEL, block_size=mc.block_size,
                    dtype=block_keys.dtype, width=block_keys.width, model_name=model_name,
                    durable=durable)
                stores.append(key_store)
            else:
                (path / KEYS_FILENAME).unlink(missing_ok=True)
                checksum_path(path / KEYS_FILENAME).unlink(missing_ok=True)
        except BaseException:
            for s in stores:
                s.close()
            raise
        metadata = {
            "format": _FORMAT_NAME, "format_version": FORMAT_VERSION,
            "model_name": model_name, "block_size": mc.block_size,
            "num_levels": mc.num_levels, "embedding_dim": gister.embed_dim,
            "gist_dtype": mc.gist_dtype, "gist_checkpoint_id": gist_checkpoint_id,
            "gist_batch": gister.gist_batch, "read": READ_MODE,
            **_input_metadata(gister),
            "mc_config": dataclasses.asdict(mc), "gist_config": dataclasses.asdict(gister.cfg),
            "retrieval_keys": None if block_keys is None else block_keys.signature(),
            "counts": [0] * (mc.num_levels + 1),
        }
        if key_store is not None:
            stores = stores[:-1]
        try:
            tree = cls(stores, mc, gister, path=path, metadata=metadata,
                       view_capacity_tokens=view_capacity_tokens, block_keys=block_keys,
                       key_store=key_store)
            tree._write_metadata()  # last: its presence marks a complete store
        except BaseException:
            for s in stores + ([key_store] if key_store is not None else []):
                s.close()
            raise
        return tree

    @classmethod
    def open(cls, path: str | os.PathLike, mc: MCConfig, gister: BlockGister, *,
             model_name: str | None = None, gist_checkpoint_id: str | None = None,
             durable: bool = True, view_capacity_tokens: int | None = None,
             block_keys: Any = None, verify: bool = True) -> "MegaContextTree":
        """Open an on-disk store, validating metadata.json and every header against `mc`
        and `gister`, and (`verify`, default) every stored row: checksums, token ids inside
        the gister's vocabulary.

        Nothing on disk changes until all of it passed. Then a torn tail is truncated
        (bytes per level in `tree.recovered_bytes`), and complete blocks whose gists were
        lost in a crash are gisted. `model_name` / `gist_checkpoint_id`, when given, must
        match what the store was written with. A version-1 store (before checksums) opens
        with a warning, unverified beyond headers, lengths and token ids.
        """
        path = Path(path)
        meta_path = path / _METADATA
        if not meta_path.is_file():
            raise MissingStoreFileError(f"{meta_path} is missing: not a MegaContext store, "
                                        f"or its creation never finished")
        metadata = _read_metadata(meta_path)
        version = metadata["format_version"]
        if version < 2:
            warnings.warn(f"{path} is a version-{version} store (written before checksums): "
                          f"its rows cannot be verified, only its headers, lengths, level "
                          f"counts and token ids; copy it into a new store (copy_rows) to "
                          f"get checksums", stacklevel=2)
        expect = {"block_size": mc.block_size, "num_levels": mc.num_levels,
                  "embedding_dim": gister.embed_dim, "gist_dtype": mc.gist_dtype}
        for key, want in expect.items():
            if metadata.get(key) != want:
                raise MetadataError(f"{meta_path}: {key} is {metadata.get(key)!r}, the "
                                    f"configuration says {want!r}")
        stored_input = {k: metadata.get(k) for k in _input_metadata(gister)}
        if "gist_input" not in metadata:  # stores from before the read pass: embeddings
            stored_input = dict(stored_input, gist_input="embeddings")
        stored_input = {k: v for k, v in stored_input.items() if v is not None}
        if _describe_input(stored_input) != _describe_input(gister.input_signature()):
            raise MetadataError(
                f"{meta_path}: LOD1 gists were made from GistNet input "
                f"{_describe_input(stored_input)}, but this GistNet reads "
                f"{_describe_input(gister.input_signature())}; the stored gists would not "
                f"match new ones: open it with the GistNet config it was written with, or "
                f"build a new store")
        if gister.reader is not None and metadata.get("read", "windows") != READ_MODE:
            warnings.warn(f"{path} was written by another read pass "
                          f"({metadata.get('read', 'windows')!r}, now {READ_MODE!r}): new "
                          f"gists may differ from an uninterrupted run in the last bits",
                          stacklevel=2)
        if metadata.get("gist_batch") != gister.gist_batch:
            warnings.warn(f"{path} was written with gist_batch={metadata.get('gist_batch')}, "
                          f"now {gister.gist_batch}: new gists may differ from an "
                          f"uninterrupted run in the last bits", stacklevel=2)
        if gist_checkpoint_id is not None and \
                metadata.get("gist_checkpoint_id") != gist_checkpoint_id:
            raise MetadataError(f"{meta_path}: gists were made by GistNet checkpoint "
                                f"{metadata.get('gist_checkpoint_id')!r}, not "
                                f"{gist_checkpoint_id!r}")
        stored_keys = metadata.get("retrieval_keys")
        want_keys = None if block_keys is None else block_keys.signature()
        if stored_keys != want_keys:
            if stored_keys is None:
                raise MetadataError(
                    f"{meta_path}: this store keeps no retrieval keys (written without them, "
                    f"or by a version before them), but retrieval focus needs keys "
                    f"{want_keys}: build a new store with them")
            if want_keys is None:
                raise MetadataError(
                    f"{meta_path}: this store keeps retrieval keys {stored_keys}; open it "
                    f"with their key reader (focus_policy='retrieval') so new blocks get "
                    f"keys too")
            raise MetadataError(f"{meta_path}: stored retrieval keys are {stored_keys}, the "
                                f"configuration asks for {want_keys}")
        stores: list[DiskLevelStore] = []
        key_store = None
        try:
            # 1. check everything, changing nothing
            for l, dt, w in cls._level_layout(mc, gister):
                stores.append(DiskLevelStore.open(
                    path / level_filename(l), level=l, block_size=mc.block_size, dtype=dt,
                    width=w, model_name=model_name, durable=durable, verify=verify,
                    vocab_size=gister.vocab_size if l == 0 else None, version=version))
            if block_keys is not None:
                key_store = DiskLevelStore.open(
                    path / KEYS_FILENAME, level=KEYS_LEVEL, block_size=mc.block_size,
                    dtype=block_keys.dtype, width=block_keys.width, model_name=model_name,
                    durable=durable, verify=verify, version=version)
            _check_level_counts(stores, key_store, mc.block_size, path)
            recorded = metadata["counts"]
            for l, (s, n) in enumerate(zip(stores, recorded)):
                if len(s) < n:  # metadata counts are written after the headers' are durable
                    raise LostEntriesError(
                        f"{meta_path} records {n} entries of LOD{l}, but the header of "
                        f"{s.path.name} counts only {len(s)}: {n - len(s)} complete entries "
                        f"were lost (no crash leaves this; the header or metadata was "
                        f"altered)")
            # 2. recover: trim torn tails, gist the blocks whose gists a crash lost
            for s in stores + ([key_store] if key_store is not None else []):
                s.trim_torn_tail()
            tree = cls(stores, mc, gister, path=path, metadata=dict(metadata),
                       view_capacity_tokens=view_capacity_tokens, block_keys=block_keys,
                       key_store=key_store)
        except BaseException:
            for s in stores + ([key_store] if key_store is not None else []):
                s.close()
            raise
        tree._metadata_written = metadata
        tree._write_metadata()  # only if a crash left it stale
        return tree

    @staticmethod
    def _level_layout(mc: MCConfig, gister: BlockGister):
        yield 0, np.dtype(np.uint32), 1
        for l in range(1, mc.num_levels + 1):
            yield l, _GIST_DTYPES[mc.gist_dtype], gister.embed_dim

    # ------------------------------------------------------------------ appending

    def append(self, tokens) -> AppendResult:
        """Append any number of token ids (1-D, integers in [0, vocab)). Gists every block
        that becomes complete, at every level, exactly once; durable on disk on return.
        (`append_to_trees` appends to several trees with shared GistNet calls.)"""
        return append_to_trees([self], [tokens])[0]

    def _gist_complete_blocks(self) -> None:
        _gist_pending([self])

    def _read_new_blocks(self) -> None:
        """The read pass of the LOD1 blocks that are complete but lack gists (GistNet
        reads hidden states) or keys: one forward for both (`BlockGister.read_blocks`),
        kept until `_level_inputs(1)` and `_read_new_keys` take their parts."""
        K = self.mc.block_size
        complete = len(self.stores[0]) // K
        done = [len(self.stores[1])] if self.gister.cfg.input == "hidden" else []
        if self.key_store is not None:
            done.append(len(self.key_store))
        self._read = None
        if not done or min(done) >= complete:
            return
        first = min(done)
        lo = self.gister.context_start(first * K)
        ids = self.stores[0].read(lo, complete * K)[:, 0]
        self._read = (first, self.gister.read_blocks(
            ids[first * K - lo:], context=ids[:first * K - lo], context_at=lo,
            state=self._read_state))

    def _read_part(self, name: str, first: int) -> np.ndarray:
        """Rows of the pending read's `name` output for blocks first.. (see
        `_read_new_blocks`)."""
        start, out = self._read
        return out[name][(first - start) * self.mc.block_size:]

    def _level_inputs(self, level: int) -> np.ndarray:
        """GistNet's inputs for this level's blocks that are complete but not yet gisted
        (`BlockGister.block_inputs`; level 1's hidden states from `_read_new_blocks`)."""
        K = self.mc.block_size
        child, parent = self.stores[level - 1], self.stores[level]
        done, complete = len(parent), len(child) // K
        if complete <= done:
            return self.gister.block_inputs(level, np.zeros((0,), np.int32))
        ids_or_gists = child.read(done * K, complete * K)
        if level == 1:
            features = (self._read_part("hidden", done) if self.gister.cfg.input == "hidden"
                        else None)
            return self.gister.block_inputs(1, ids_or_gists[:, 0], features=features)
        return self.gister.block_inputs(level, ids_or_gists)

    def _store_gists(self, level: int, gists: np.ndarray, calls: int) -> None:
        self.stores[level].append(gists)
        self.stats.blocks_gisted[level] += len(gists)
        self.stats.gist_calls += calls

    def _read_new_keys(self) -> None:
        K = self.mc.block_size
        if self.key_store is None:
            return
        done, complete = len(self.key_store), len(self.stores[0]) // K
        if complete > done:
            self.key_store.append(self.block_keys.rows(self._read_part("keys", done)))
        self._read = None

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise TreeInputError(f"tokens must be a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size == 0:
            return np.zeros((0,), np.uint32)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TreeInputError(f"tokens must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        limit = self.gister.vocab_size if self.gister.vocab_size is not None else 2**32
        if lo < 0 or hi >= limit:
            raise TreeInputError(f"token ids must lie in [0, {limit}), got range [{lo}, {hi}]")
        return arr.astype(np.uint32)

    # ------------------------------------------------------------------ reading

    @property
    def num_levels(self) -> int:
        return self.mc.num_levels

    @property
    def num_tokens(self) -> int:
        return len(self.stores[0])

    @property
    def counts(self) -> tuple[int, ...]:
        """Entries per level 0..num_levels."""
        return tuple(len(s) for s in self.stores)

    @property
    def backend(self) -> str:
        return "disk" if self.path is not None else "memory"

    @property
    def recovered_bytes(self) -> tuple[int, ...]:
        """Torn-tail bytes truncated per level when this store was opened (0 in memory)."""
        return tuple(getattr(s, "truncated_bytes", 0) for s in self.stores)

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """LOD0 token ids [start, stop) as uint32."""
        stop = self.num_tokens if stop is None else stop
        return self.stores[0].read(start, stop)[:, 0]

    @property
    def has_keys(self) -> bool:
        return self.key_store is not None

    def keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Retrieval keys of LOD1 blocks [start, stop): [n, width] in the storage dtype."""
        if self.key_store is None:
            raise ValueError("this tree keeps no retrieval keys (built without block_keys)")
        return self.key_store.read(start, len(self.key_store) if stop is None else stop)

    def gists(self, level: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Gists of `level` (1..num_levels), rows [start, stop), storage dtype, [n, D]."""
        if not 1 <= level <= self.num_levels:
            raise IndexError(f"gist level must lie in 1..{self.num_levels}, got {level}")
        store = self.stores[level]
        return store.read(start, len(store) if stop is None else stop)

    @property
    def ingest_buffer(self) -> np.ndarray:
        """Tokens of the incomplete newest block (at LOD0 only, not yet gisted)."""
        return self.tokens(len(self.stores[1]) * self.mc.block_size)

    def nbytes(self) -> tuple[int, ...]:
        """Bytes stored per level (with the 64-byte header on disk)."""
        return tuple(s.nbytes for s in self.stores)

    # ------------------------------------------------------------------ device view

    def view_capacities(self) -> tuple[int, ...]:
        """Rows per level that `view()` would allocate now."""
        K = self.mc.block_size
        if self.view_capacity_tokens is not None:
            caps = tuple(max(1, -(-self.view_capacity_tokens // K**l))
                         for l in range(self.num_levels + 1))
            for l, (n, c) in enumerate(zip(self.counts, caps)):
                if n > c:
                    raise TreeCapacityError(
                        f"LOD{l} holds {n} entries, more than the fixed view capacity {c} "
                        f"(view_capacity_tokens={self.view_capacity_tokens})")
            return caps
        return tuple(max(_MIN_VIEW_ROWS, _next_pow2(n)) for n in self.counts)

    def view(self) -> TreeView:
        """Device arrays of every level, padded to `view_capacities()` rows with zeros."""
        self._require_open()
        caps = self.view_capacities()
        arrays = []
        for l, (store, cap) in enumerate(zip(self.stores, caps)):
            buf, n = self._view_arrays[l], len(store)
            if buf is None or buf.shape[0] != cap:  # (re)allocate: upload everything
                host = np.zeros((cap, store.width), store.dtype)
                host[:n] = store.read(0, n)
                buf = jnp.asarray(host[:, 0].astype(np.int32) if l == 0 else host)
            elif n > self._view_synced[l]:  # write only the new rows
                s = self._view_synced[l]
                rows = store.read(s, n)
                rows = rows[:, 0].astype(np.int32) if l == 0 else rows
                bucket = _next_pow2(max(len(rows), 8))  # bounded set of compiled shapes
                rows = np.concatenate([rows, np.zeros((bucket - len(rows),) + rows.shape[1:],
                                                      rows.dtype)])
                buf = _write_rows(buf, jnp.asarray(rows), jnp.int32(s), jnp.int32(n - s))
            self._view_arrays[l], self._view_synced[l] = buf, n
            arrays.append(buf)
        keys = None
        if self.key_store is not None:  # same rows as LOD1
            cap, n = caps[1], len(self.key_store)
            if self._keys_view is None or self._keys_view.shape[0] != cap:
                host = np.zeros((cap, self.key_store.width), self.key_store.dtype)
                host[:n] = self.key_store.read(0, n)
                self._keys_view = jnp.asarray(host)
            elif n > self._keys_synced:
                rows = self.key_store.read(self._keys_synced, n)
                bucket = _next_pow2(max(len(rows), 8))
                rows = np.concatenate([rows, np.zeros((bucket - len(rows), rows.shape[1]),
                                                      rows.dtype)])
                self._keys_view = _write_rows(self._keys_view, jnp.asarray(rows),
                                              jnp.int32(self._keys_synced),
                                              jnp.int32(n - self._keys_synced))
            self._keys_synced = n
            keys = self._keys_view
        return TreeView(tokens=arrays[0], gists=tuple(arrays[1:]),
                        counts=jnp.asarray(self.counts, jnp.int32), keys=keys)

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """fsync every level and rewrite metadata.json with the current counts."""
        self._require_open()
        for s in self._all_stores():
            s.flush()
        self._write_metadata()

    def close(self) -> None:
        if self._closed:
            return
        if self.path is not None:
            self._write_metadata()  # (after the level files are durable)
        for s in self._all_stores():
            s.close()
        self._closed = True

    def _all_stores(self) -> list[LevelStore]:
        return self.stores + ([self.key_store] if self.key_store is not None else [])

    def __enter__(self) -> "MegaContextTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError("the tree is closed")

    def _write_metadata(self) -> None:
        """Rewrite metadata.json with the current counts, atomically, once the level files
        counting them are durable: recorded counts never exceed the headers' (a header
        counting fewer entries on open is `LostEntriesError`). Unchanged content is not
        rewritten (a store only read is left as it was: open + close write nothing)."""
        if self.path is None or self._metadata is None:
            return
        meta = {k: v for k, v in self._metadata.items() if k != "checksum"}
        meta["counts"] = list(self.counts)
        if meta.get("format_version", FORMAT_VERSION) >= 2:
            meta["checksum"] = _metadata_checksum(meta)
        self._metadata = meta
        if meta == self._metadata_written:
            return
        for s in self._all_stores():
            s.flush()
        tmp = self.path / (_METADATA + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._metadata, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / _METADATA)  # atomic: old or new, never half
        self._metadata_written = meta
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def append_to_trees(trees: Sequence[MegaContextTree], tokens: Sequence) -> list[AppendResult]:
    """Append `tokens[i]` (as `MegaContextTree.append` takes them; may be empty) to
    `trees[i]`, gisting the new blocks of every level of all trees in shared GistNet calls
    when the trees share one `BlockGister` (a session's streams do): B streams that each
    complete one block cost one call, not B. Each tree ends bit-identical to appending
    to it alone (`BlockGister.gist_inputs`), and stays durable level by level, LOD0
    first. The read passes run per tree (each has its own open-chunk cache)."""
    if len(trees) != len(tokens):
        raise ValueError(f"{len(trees)} trees but {len(tokens)} token sequences")
    ids = []
    for tree, t in zip(trees, tokens):
        tree._require_open()
        ids.append(tree._check_tokens(t))  # every input checked before anything is stored
    before = [tree.counts for tree in trees]
    for tree, x in zip(trees, ids):
        if len(x):
            tree.stores[0].append(x.reshape(-1, 1))
    _gist_pending([t for t, x in zip(trees, ids) if len(x)])
    return [AppendResult(tree.counts[0], tuple(zip(b, tree.counts)))
            for tree, b in zip(trees, before)]


def _gist_pending(trees: Sequence[MegaContextTree]) -> None:
    """Gist every complete, not yet gisted block of `trees`, level by level from LOD1
    up; trees sharing a gister (and gist dtype) share its calls."""
    groups: dict[tuple, list[MegaContextTree]] = {}
    for tree in trees:
        groups.setdefault((id(tree.gister), tree.mc.num_levels, tree.mc.gist_dtype),
                          []).append(tree)
    for group in groups.values():
        gister = group[0].gister
        for tree in group:
            tree._read_new_blocks()
        for level in range(1, group[0].mc.num_levels + 1):
            inputs = [tree._level_inputs(level) for tree in group]
            if not any(len(x) for x in inputs):
                continue
            calls0 = gister.calls
            gists = gister.gist_inputs(level, inputs, group[0].stores[level].dtype)
            calls = gister.calls - calls0
            for tree, g in zip(group, gists):
                if len(g):
                    tree._store_gists(level, g, calls)
        for tree in group:
            tree._read_new_keys()


def _check_reads_keys(gister: BlockGister, block_keys: Any) -> None:
    """A tree keeping retrieval keys reads them in its one read pass (the gister's)."""
    rc, reader = block_keys.rc, gister.reader
    if reader is None or "keys" not in reader.outputs:
        raise ValueError("this tree keeps retrieval keys, but its gister's read pass reads "
                         "none: build it with BlockGister.from_base(..., retrieval=rc) so "
                         "one forward gives GistNet's inputs and the keys")
    if (reader.qk_layers, reader.chunk, reader.block_size) != \
            (tuple(rc.layers), rc.chunk, block_keys.block_size):
        raise ValueError(f"the read pass reads keys at layers {reader.qk_layers} in chunks "
                         f"of {reader.chunk} (blocks of {reader.block_size}); the stored "
                         f"keys are layers {tuple(rc.layers)}, chunk {rc.chunk}, blocks of "
                         f"{block_keys.block_size}")


def copy_rows(src: MegaContextTree, dst: MegaContextTree) -> None:
    """Append every stored row of `src` — tokens, gists of every level, retrieval keys — to
    the empty tree `dst` as they are (nothing is re-gisted, so the copy is bit-identical),
    then make `dst` durable (an on-disk `dst` also gets its metadata rewritten)."""
    src._require_open()
    dst._require_open()
    if dst.num_tokens:
        raise ValueError(f"copy_rows needs an empty destination tree, it holds "
                         f"{dst.num_tokens} tokens")
    if len(src.stores) != len(dst.stores) or (src.key_store is None) != (dst.key_store is None):
        raise ValueError("copy_rows: source and destination trees keep different levels or "
                         "keys")
    pairs = list(zip(src.stores, dst.stores))
    if src.key_store is not None:
        pairs.append((src.key_store, dst.key_store))
    for a, b in pairs:
        if len(a):
            b.append(a.read(0, len(a)))
    if dst.path is not None:
        dst.flush()


def _input_metadata(gister: BlockGister) -> dict:
    """metadata.json fields naming what LOD1 gists are made from (all three always)."""
    cfg = gister.cfg
    return {"gist_input": cfg.input, "input_layer": cfg.input_layer,
            "read_chunk": cfg.read_chunk}


def _describe_input(sig: dict) -> str:
    if sig.get("gist_input") == "hidden":
        return (f"'hidden' (layer {sig.get('input_layer')}, read_chunk "
                f"{sig.get('read_chunk')})")
    return repr(sig.get("gist_input"))


def _metadata_checksum(meta: dict) -> str:
    """CRC32 of metadata.json's content (every key but "checksum"), canonical JSON."""
    body = json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":"))
    return f"crc32:{zlib.crc32(body.encode()):08x}"


def _read_metadata(meta_path: Path) -> dict:
    """metadata.json parsed and checked in itself: format, version, checksum (version 2),
    counts. Raises `MetadataError` (or a subclass), `UnsupportedVersionError`."""
    try:
        metadata = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad json or utf-8
        raise MetadataError(f"{meta_path} is unreadable: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT_NAME:
        raise MetadataError(f"{meta_path} is not MegaContext store metadata")
    version = metadata.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"{meta_path}: format_version {version!r}, this code reads versions "
            f"{'/'.join(map(str, READABLE_VERSIONS))}")
    if version >= 2:
        stored = metadata.get("checksum")
        if stored != _metadata_checksum(metadata):
            raise MetadataChecksumError(
                f"{meta_path}: content does not match its checksum {stored!r}: the file is "
                f"damaged (or was edited)")
    counts, levels = metadata.get("counts"), metadata.get("num_levels")
    if not isinstance(counts, list) or type(levels) is not int or len(counts) != levels + 1 \
            or any(type(c) is not int or c < 0 for c in counts):
        raise MetadataError(f"{meta_path}: counts {counts!r} are not one non-negative "
                            f"integer per level")
    return metadata


def _check_level_counts(stores: Sequence[LevelStore], key_store: LevelStore | None,
                        block_size: int, path: Path | None) -> None:
    """No level (or the retrieval keys) holds more entries than its children complete."""
    for l in range(1, len(stores)):
        if len(stores[l]) > len(stores[l - 1]) // block_size:
            where = f" in {path}" if path else ""
            raise InconsistentLevelsError(
                f"LOD{l} has {len(stores[l])} entries{where}, but LOD{l - 1} has only "
                f"{len(stores[l - 1])} (at most {len(stores[l - 1]) // block_size} complete "
                f"blocks)")
    if key_store is not None and len(key_store) > len(stores[0]) // block_size:
        raise InconsistentLevelsError(
            f"{KEYS_FILENAME} has {len(key_store)} rows, but LOD0 holds only "
            f"{len(stores[0]) // block_size} complete blocks")


def checksum_bytes_per_million_tokens(mc: MCConfig, embed_dim: int) -> dict[str, float]:
    """Analytic bytes the version-2 checksums add per 1,000,000 tokens at each level: 4
    per complete group of rows in the `.crc` files (the header's checksums take its
    formerly reserved bytes, so headers do not grow)."""
    out = {"LOD0": 1e6 / _group_rows(4) * 4}
    row = _GIST_DTYPES[mc.gist_dtype].itemsize * embed_dim
    for l in range(1, mc.num_levels + 1):
        out[f"LOD{l}"] = 1e6 / mc.block_size**l / _group_rows(row) * 4
    return out


def bytes_per_million_tokens(mc: MCConfig, embed_dim: int) -> dict[str, float]:
    """Analytic payload bytes per 1,000,000 tokens at each level (headers excluded)."""
    gist_bytes = _GIST_DTYPES[mc.gist_dtype].itemsize * embed_dim
    out = {"LOD0": 1e6 * 4.0}
    for l in range(1, mc.num_levels + 1):
        out[f"LOD{l}"] = 1e6 / mc.block_size**l * gist_bytes
    return out

