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

What makes LOD1 children and the gists (the read pass, fixed gist batches) is
`mcjax.tree.read_pass`; where the levels live (memory, or the on-disk format with its
checksums and crash recovery) is `mcjax.tree.store`. Choose a backend with
`MegaContextTree.in_memory(...)`, `.create(path, ...)`, `.open(path, ...)`.

Device view: `MegaContextTree.view()` returns a `TreeView` of fixed-capacity device
arrays. Capacity per level is either fixed by `view_capacity_tokens` (level l holds
ceil(C / K**l) rows; exceeding it raises `TreeCapacityError`) or, by default, the next
power of two >= the entry count (at least `_MIN_VIEW_ROWS`), so a stream of T tokens
changes each level's shape at most log2(T) times (each change recompiles jitted consumers
once). Rows are uploaded as the runtime uploads them (`mcjax.tree.view`): between
growths only the new rows are written into the existing arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import MCConfig
from mcjax.tree.read_pass import READ_MODE, BlockGister, ReadState
from mcjax.tree.store import (FORMAT_NAME, FORMAT_VERSION, GIST_DTYPES, KEYS_FILENAME,
                              KEYS_LEVEL, METADATA_FILENAME, DiskLevelStore, LevelStore,
                              LostEntriesError, MemoryLevelStore, MetadataError,
                              MissingStoreFileError, StoreExistsError, check_level_counts,
                              checksum_path, encode_model_name, level_filename,
                              metadata_checksum, read_metadata)
from mcjax.tree.view import TreeView, bucket_rows, view_update, write_view

__all__ = ["MegaContextTree", "AppendResult", "TreeStats", "append_to_trees", "copy_rows",
           "TreeInputError", "TreeCapacityError"]

_MIN_VIEW_ROWS = 64


class TreeInputError(ValueError):
    """Tokens given to `append` are not a 1-D array of in-range integer ids."""


class TreeCapacityError(RuntimeError):
    """The fixed view capacity cannot hold the tree."""


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


@jax.jit
def _write_tree_view(view: TreeView, *update) -> TreeView:
    """`write_view` into one tree's view (no batch axis): the update's batch of one."""
    batched = write_view(jax.tree.map(lambda x: x[None], view), *update)
    return jax.tree.map(lambda x: x[0], batched)


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
        self.stores = list(stores)
        self.path = path
        self._metadata = metadata
        self._metadata_written: dict | None = None  # what metadata.json holds now
        self.view_capacity_tokens = view_capacity_tokens
        self.stats = TreeStats([0] * (mc.num_levels + 1))
        self._view: TreeView | None = None  # the last view() and the rows it holds per level
        self._view_synced = np.zeros(mc.num_levels + 1, np.int64)
        self._closed = False
        # the read pass's KV cache of the open chunk: rebuilt on the first append when the
        # tree was opened or copied
        self._read_state = ReadState()
        self._read = None  # (first block, read-pass outputs) of blocks read, not yet used
        check_level_counts(self.stores, key_store, mc.block_size, path)
        self._gist_complete_blocks()  # after a crash: gist blocks whose gists were lost

    # ------------------------------------------------------------------ construction

    @classmethod
    def in_memory(cls, mc: MCConfig, gister: BlockGister, *,
                  view_capacity_tokens: int | None = None, block_keys: Any = None
                  ) -> "MegaContextTree":
        """`block_keys` (a `mcjax.retrieval.BlockKeys`): also keep retrieval keys (read by
        the gister's read pass, built with `BlockGister.from_base(..., retrieval=rc)`)."""
        stores = [MemoryLevelStore(0, np.uint32, 1)] + [
            MemoryLevelStore(l, GIST_DTYPES[mc.gist_dtype], gister.embed_dim)
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
        encode_model_name(model_name)  # fail before touching the disk
        if gister.embed_dim > 0xFFFF or mc.block_size > 0xFFFF:
            raise ValueError("embedding_dim and block_size must fit in a u16")
        if block_keys is not None and block_keys.width > 0xFFFF:
            raise ValueError(f"retrieval key rows of {block_keys.width} values do not fit the "
                             f"header's u16 width field")
        path.mkdir(parents=True, exist_ok=True)
        if (path / METADATA_FILENAME).exists() and not overwrite:
            raise StoreExistsError(f"{path} already holds a MegaContext store "
                                   f"(pass overwrite=True to replace it)")
        stores: list[DiskLevelStore] = []
        try:
            for l, dt, w in cls._level_layout(mc, gister):
                stores.append(DiskLevelStore.create(
                    path / level_filename(l), level=l, block_size=mc.block_size, dtype=dt,
                    width=w, model_name=model_name, durable=durable))
                if l == 0:  # we hold the lock now; until metadata is rewritten, the
                    (path / METADATA_FILENAME).unlink(missing_ok=True)  # store is unopenable
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
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
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
        meta_path = path / METADATA_FILENAME
        if not meta_path.is_file():
            raise MissingStoreFileError(f"{meta_path} is missing: not a MegaContext store, "
                                        f"or its creation never finished")
        metadata = read_metadata(meta_path)
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
            check_level_counts(stores, key_store, mc.block_size, path)
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
            yield l, GIST_DTYPES[mc.gist_dtype], gister.embed_dim

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
        return tuple(bucket_rows(n, _MIN_VIEW_ROWS) for n in self.counts)

    def view(self) -> TreeView:
        """Device arrays of every level, padded to `view_capacities()` rows with zeros (an
        earlier view is a value: later appends never change it)."""
        self._require_open()
        view, synced = self._sized_view(self.view_capacities())
        update = view_update([self], synced[None])
        if update is not None:
            view, synced = _write_tree_view(view, *update), update[4][0].astype(np.int64)
        self._view, self._view_synced = view, synced
        return view

    def _sized_view(self, caps: tuple[int, ...]) -> tuple[TreeView, np.ndarray]:
        """The last view with every level of another capacity than `caps` replaced by zeros
        of that capacity, and the rows it then holds per level (the retrieval keys follow
        LOD1)."""
        old, synced = self._view, self._view_synced.copy()

        def sized(l: int, array: jax.Array | None, width: int, dtype) -> jax.Array:
            if array is not None and array.shape[0] == caps[l]:
                return array
            synced[l] = 0
            return jnp.zeros((caps[l],) if l == 0 else (caps[l], width), dtype)

        arrays = [sized(l, None if old is None else (old.tokens, *old.gists)[l], s.width,
                        np.int32 if l == 0 else s.dtype)
                  for l, s in enumerate(self.stores)]
        keys = None
        if self.key_store is not None:  # LOD1's capacity, so regrown with it
            keys = sized(1, None if old is None else old.keys, self.key_store.width,
                         self.key_store.dtype)
        return TreeView(tokens=arrays[0], gists=tuple(arrays[1:]),
                        counts=jnp.asarray(synced, jnp.int32), keys=keys), synced

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
            meta["checksum"] = metadata_checksum(meta)
        self._metadata = meta
        if meta == self._metadata_written:
            return
        for s in self._all_stores():
            s.flush()
        tmp = self.path / (METADATA_FILENAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._metadata, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / METADATA_FILENAME)  # atomic: old or new, never half
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
