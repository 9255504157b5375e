"""The on-disk format of a MegaContext tree: one file per level, checksums, metadata.json.

Backends, one interface (`LevelStore`): `MemoryLevelStore` (numpy, capacity doubling) and
`DiskLevelStore` (one `LOD{l}.ctx` file per level, format below, read through a memory
map). A tree chooses one with `MegaContextTree.in_memory(...)`, `.create(path, ...)`,
`.open(path, ...)` (`mcjax.tree.core`).

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
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np

from mcjax.config import MCConfig

__all__ = [
    "LevelStore", "MemoryLevelStore", "DiskLevelStore", "Header",
    "StoreError", "MissingStoreFileError", "BadMagicError", "UnsupportedVersionError",
    "LevelMismatchError", "BlockSizeMismatchError", "EmbeddingDimMismatchError",
    "DtypeMismatchError", "ModelMismatchError", "TruncatedFileError", "CorruptHeaderError",
    "InconsistentLevelsError", "LostEntriesError", "MetadataError", "StoreExistsError",
    "StoreLockedError", "ChecksumError", "HeaderChecksumError", "RowChecksumError",
    "MetadataChecksumError", "TokenRangeError",
    "MAGIC", "FORMAT_VERSION", "READABLE_VERSIONS", "HEADER_SIZE", "DTYPE_CODES",
    "CHECKSUM_SUFFIX", "KEYS_LEVEL", "KEYS_FILENAME", "METADATA_FILENAME", "FORMAT_NAME",
    "GIST_DTYPES", "read_header", "level_filename", "checksum_path", "encode_model_name",
    "read_metadata", "metadata_checksum", "check_level_counts",
    "bytes_per_million_tokens", "checksum_bytes_per_million_tokens",
]


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
GIST_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
               "bfloat16": np.dtype(ml_dtypes.bfloat16)}
METADATA_FILENAME = "metadata.json"
KEYS_LEVEL = 0xFF  # header level code of the retrieval-keys file (one row per LOD1 block)
KEYS_FILENAME = "KEYS.ctx"
FORMAT_NAME = "mcjax.megacontext"


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


def encode_model_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > _MODEL_NAME_BYTES:
        raise ValueError(f"model name {name!r} is {len(raw)} bytes in utf-8; the header "
                         f"holds at most {_MODEL_NAME_BYTES}")
    return raw.ljust(_MODEL_NAME_BYTES, b"\0")


def _pack_header(level: int, block_size: int, dim: int, dtype: np.dtype, count: int,
                 model_name: str, *, version: int = FORMAT_VERSION, group_rows: int = 0,
                 tail_crc: int = 0) -> bytes:
    head = _HEADER.pack(MAGIC, version, level, block_size, dim, _CODE_OF[dtype],
                        count, encode_model_name(model_name))
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


# --------------------------------------------------------------------------- metadata.json


def metadata_checksum(meta: dict) -> str:
    """CRC32 of metadata.json's content (every key but "checksum"), canonical JSON."""
    body = json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":"))
    return f"crc32:{zlib.crc32(body.encode()):08x}"


def read_metadata(meta_path: Path) -> dict:
    """metadata.json parsed and checked in itself: format, version, checksum (version 2),
    counts. Raises `MetadataError` (or a subclass), `UnsupportedVersionError`."""
    try:
        metadata = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad json or utf-8
        raise MetadataError(f"{meta_path} is unreadable: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise MetadataError(f"{meta_path} is not MegaContext store metadata")
    version = metadata.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"{meta_path}: format_version {version!r}, this code reads versions "
            f"{'/'.join(map(str, READABLE_VERSIONS))}")
    if version >= 2:
        stored = metadata.get("checksum")
        if stored != metadata_checksum(metadata):
            raise MetadataChecksumError(
                f"{meta_path}: content does not match its checksum {stored!r}: the file is "
                f"damaged (or was edited)")
    counts, levels = metadata.get("counts"), metadata.get("num_levels")
    if not isinstance(counts, list) or type(levels) is not int or len(counts) != levels + 1 \
            or any(type(c) is not int or c < 0 for c in counts):
        raise MetadataError(f"{meta_path}: counts {counts!r} are not one non-negative "
                            f"integer per level")
    return metadata


def check_level_counts(stores: Sequence[LevelStore], key_store: LevelStore | None,
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
    row = GIST_DTYPES[mc.gist_dtype].itemsize * embed_dim
    for l in range(1, mc.num_levels + 1):
        out[f"LOD{l}"] = 1e6 / mc.block_size**l / _group_rows(row) * 4
    return out


def bytes_per_million_tokens(mc: MCConfig, embed_dim: int) -> dict[str, float]:
    """Analytic payload bytes per 1,000,000 tokens at each level (headers excluded)."""
    gist_bytes = GIST_DTYPES[mc.gist_dtype].itemsize * embed_dim
    out = {"LOD0": 1e6 * 4.0}
    for l in range(1, mc.num_levels + 1):
        out[f"LOD{l}"] = 1e6 / mc.block_size**l * gist_bytes
    return out

