"""MegaContext tree: append-only hierarchical store of the whole history (SPEC §2.3).

Levels: LOD0 holds the raw token ids; LODl (l = 1..num_levels) one gist per aligned group
of K = block_size entries of LOD(l-1), i.e. one per K**l tokens. Any number of tokens can
be appended at once: every block that becomes complete is gisted exactly once.

The package, bottom up:

* `store` — where the levels live: `MemoryLevelStore`, or `DiskLevelStore` in the
  versioned, checksummed on-disk format (`LOD{l}.ctx` files, `metadata.json`, crash
  recovery), its errors (`StoreError` and subclasses) and its sizes per 1M tokens.
* `read_pass` — what LOD1 children and gists are made from: `ChunkReader` (the base
  model reads each history token once, SPEC §2.3a) and `BlockGister` (GistNet over
  complete blocks in fixed-size batches).
* `view` — the device side: `TreeView`, fixed-capacity arrays for jitted gathers, and the
  one uploader of tree rows into it (`view_update` on the host, `write_view` on the
  device), shared by `MegaContextTree.view()` and the runtime.
* `core` — `MegaContextTree` (in memory, `create`, `open`), `append_to_trees`,
  `copy_rows`.
"""

from mcjax.tree.core import (AppendResult, MegaContextTree, TreeCapacityError, TreeInputError,
                             TreeStats, append_to_trees, copy_rows)
from mcjax.tree.read_pass import (READ_MODE, BlockGister, ChunkReader, ReadState,
                                  default_gist_batch)
from mcjax.tree.store import (CHECKSUM_SUFFIX, DTYPE_CODES, FORMAT_VERSION, HEADER_SIZE,
                              KEYS_FILENAME, KEYS_LEVEL, MAGIC, READABLE_VERSIONS,
                              BadMagicError, BlockSizeMismatchError, ChecksumError,
                              CorruptHeaderError, DiskLevelStore, DtypeMismatchError,
                              EmbeddingDimMismatchError, Header, HeaderChecksumError,
                              InconsistentLevelsError, LevelMismatchError, LevelStore,
                              LostEntriesError, MemoryLevelStore, MetadataChecksumError,
                              MetadataError, MissingStoreFileError, ModelMismatchError,
                              RowChecksumError, StoreError, StoreExistsError,
                              StoreLockedError, TokenRangeError, TruncatedFileError,
                              UnsupportedVersionError, bytes_per_million_tokens,
                              checksum_bytes_per_million_tokens, checksum_path,
                              level_filename, read_header)
from mcjax.tree.view import TreeView, view_update, write_view

__all__ = [
    "TreeView", "view_update", "write_view",
    "MegaContextTree", "AppendResult", "TreeStats", "append_to_trees", "copy_rows",
    "TreeInputError", "TreeCapacityError",
    "BlockGister", "ChunkReader", "ReadState", "READ_MODE", "default_gist_batch",
    "LevelStore", "MemoryLevelStore", "DiskLevelStore", "Header",
    "StoreError", "MissingStoreFileError", "BadMagicError", "UnsupportedVersionError",
    "LevelMismatchError", "BlockSizeMismatchError", "EmbeddingDimMismatchError",
    "DtypeMismatchError", "ModelMismatchError", "TruncatedFileError", "CorruptHeaderError",
    "InconsistentLevelsError", "LostEntriesError", "MetadataError", "StoreExistsError",
    "StoreLockedError", "ChecksumError", "HeaderChecksumError", "RowChecksumError",
    "MetadataChecksumError", "TokenRangeError",
    "MAGIC", "FORMAT_VERSION", "READABLE_VERSIONS", "HEADER_SIZE", "DTYPE_CODES",
    "CHECKSUM_SUFFIX", "KEYS_LEVEL", "KEYS_FILENAME",
    "read_header", "level_filename", "checksum_path", "bytes_per_million_tokens",
    "checksum_bytes_per_million_tokens",
]
