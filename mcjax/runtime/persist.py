"""On-disk pieces of a saved session (`Session.save` / `Session.load`): arrays as raw bytes
(bit-exact for every dtype) with a manifest, durable file writes (durable directory
entries: `mcjax.base.convert.fsync_dir`, shared with the model conversion), and what makes
saves exclusive and verifiable:

- `save_lock(directory)`: one writer per save directory (a second one gets
  `SaveLockedError` at once, naming the holder); `read_lock(directory)`: a load holds the
  directory's own `flock` shared while it reads, and a save removes older saves only when
  no load holds it (`no_readers`).
- `write_checksums` / `verify_checksums`: `SHA256SUMS` in every save lists the sha256 of
  each of its files; a load checks all of them before reading anything (`SaveDamagedError`
  naming the file).
- `is_save_name` / `owned_by_saves`: which directory entries a save made (the only ones a
  later save may remove).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.errors import CheckpointError

SAVE_FORMAT = "mcjax-session"
SAVE_VERSION = 2  # 2: SHA256SUMS, the base model's fingerprint, the marker file
READABLE_VERSIONS = (1, 2)  # 1: no checksums and no fingerprint (loaded with a warning)
MARKER = ".mcjax-session-save"  # written first into every save directory a save makes
CHECKSUMS = "SHA256SUMS"
SAVE_LOCK = ".save.lock"  # held exclusively by the one save writing the directory
_SAVE_NAME = re.compile(r"(save|\.incomplete-save)-([0-9]{1,18})")


class SaveLockedError(CheckpointError):
    """Another save (this process or another) is writing the same save directory."""


class SaveDamagedError(CheckpointError):
    """A save's files do not match their recorded checksums, or are missing / unreadable."""


class BaseModelMismatchError(CheckpointError):
    """`Session.load` was given a base model with other weights than the save's."""


def is_save_name(name: str) -> bool:
    """`save-N` or `.incomplete-save-N`: the names a save gives its directories."""
    return _SAVE_NAME.fullmatch(name) is not None


def save_number(name: str) -> int | None:
    m = _SAVE_NAME.fullmatch(name)
    return None if m is None else int(m.group(2))


def owned_by_saves(path: Path) -> bool:
    """A directory a save made: a save's name and the marker file inside (a user's own
    `save-notes/` or a hand-made `save-3/` without the marker is never removed)."""
    return is_save_name(path.name) and path.is_dir() and not path.is_symlink() \
        and (path / MARKER).is_file()


def _lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot open the lock file {path}: {e.strerror}") from e


@contextlib.contextmanager
def save_lock(directory: Path) -> Iterator[None]:
    """Hold `directory`'s writer lock (non-blocking: `SaveLockedError` naming the holder
    when another save — this process or another — holds it). The lock is the kernel's
    (`flock`): it goes when its holder exits or is killed, so a stale file never blocks."""
    path = directory / SAVE_LOCK
    fd = _lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"cannot lock {path}: {e.strerror}") from e
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise SaveLockedError(
                f"{directory} is being saved into by another writer ({holder}); one save "
                f"at a time per directory: wait for it, or save elsewhere") from None
        info = f"pid {os.getpid()} on {socket.gethostname()} since " \
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _dir_fd(directory: Path) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CheckpointError(f"cannot open {directory}: {e.strerror}") from e


def _flock_within(fd: int, mode: int, wait_s: float, poll_s: float) -> bool:
    """Take the `flock` `mode` (LOCK_SH / LOCK_EX) of `fd`, retrying every `poll_s` for up
    to `wait_s`; False when it stayed held by others."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)


@contextlib.contextmanager
def _dir_locked(directory: Path, mode: int, wait_s: float, poll_s: float
                ) -> Iterator[bool]:
    """Yields whether `directory`'s own `flock` was taken in `mode` within `wait_s`
    (released on exit)."""
    fd = _dir_fd(directory)
    try:
        got = _flock_within(fd, mode, wait_s, poll_s)
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def read_lock(directory: Path, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold `directory`'s reader lock (`flock` on the directory itself: no file, so a
    read-only save loads too) shared while a load reads; waits up to `timeout_s` for a
    save removing old saves (nothing else holds it exclusively)."""
    with _dir_locked(directory, fcntl.LOCK_SH, timeout_s, 0.01) as got:
        if not got:
            raise SaveLockedError(f"{directory}: a save kept removing old saves for "
                                  f"{timeout_s:.0f} s; try again")
        yield


@contextlib.contextmanager
def no_readers(directory: Path, wait_s: float = 2.0) -> Iterator[bool]:
    """Yields True while holding `directory`'s reader lock exclusively (no load is reading:
    old saves may be removed), False when loads held it for all of `wait_s` (leave them
    for the next save)."""
    with _dir_locked(directory, fcntl.LOCK_EX, wait_s, 0.005) as got:
        yield got


@contextlib.contextmanager
def one_reader_at_a_time(save: Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold the `flock` of one save's own directory exclusively (waiting up to
    `timeout_s`): loads of the same save take turns opening its trees (the tree store
    locks its files when it opens them), and never fail for each other."""
    with _dir_locked(save, fcntl.LOCK_EX, timeout_s, 0.005) as got:
        if not got:
            raise SaveLockedError(f"{save}: another load kept reading it for "
                                  f"{timeout_s:.0f} s; try again")
        yield


def remove_older_saves(directory: Path, newest: str) -> bool:
    """Remove the saves numbered below `newest` that saves made (`owned_by_saves`:
    published ones and leftovers of killed saves), once no load reads the directory
    (`no_readers`); False when loads kept reading (they stay for the next save)."""
    limit = save_number(newest)
    with no_readers(directory) as free:
        if free:
            for old in directory.iterdir():
                n = save_number(old.name)
                if n is not None and n < limit and owned_by_saves(old):
                    shutil.rmtree(old, ignore_errors=True)
        return free


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def write_checksums(root: Path) -> None:
    """`root/SHA256SUMS`: the sha256 of every file under `root` (durable)."""
    lines = [f"{sha256_file(root / name)}  {name}\n" for name in _files(root)]
    write_durably(root / CHECKSUMS, "".join(lines).encode())


_SUM_LINE = re.compile(r"([0-9a-f]{64})  (\S+)")


def verify_checksums(root: Path) -> None:
    """Every file `root/SHA256SUMS` lists exists under `root` and has its sha256, and no
    file is missing from the list: else `SaveDamagedError` naming the file."""
    try:
        text = (root / CHECKSUMS).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SaveDamagedError(f"{root}: unreadable {CHECKSUMS}: {e}") from e
    listed: dict[str, str] = {}
    for i, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else [text]):
        m = _SUM_LINE.fullmatch(line)
        name = None if m is None else m.group(2)
        if m is None or name in listed or name.startswith("/") or ".." in name.split("/"):
            raise SaveDamagedError(f"{root}/{CHECKSUMS}: line {i + 1} is damaged: {line!r}")
        listed[name] = m.group(1)
    present = _files(root)
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise SaveDamagedError(f"{root}: files not in {CHECKSUMS}: {unlisted[:5]}")
    for name, want in listed.items():
        path = root / name
        if not path.is_file():
            raise SaveDamagedError(f"{root}: {name} is missing (listed in {CHECKSUMS})")
        got = sha256_file(path)
        if got != want:
            raise SaveDamagedError(f"{path}: sha256 {got[:16]}… differs from the recorded "
                                   f"{want[:16]}…: the file is damaged")


def keyed_leaves(tree) -> tuple[dict[str, np.ndarray], Any]:
    """({keystr path: host array} of a pytree's leaves, its treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}, treedef


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Arrays as raw bytes in one .npz (bit-exact for every dtype, bfloat16 included);
    returns the manifest (name -> dtype, shape) that `read_arrays` needs."""
    manifest, raw = {}, {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.asarray(a, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        manifest[name] = {"key": f"a{i}", "dtype": str(a.dtype), "shape": list(a.shape)}
        raw[f"a{i}"] = a.reshape(-1).view(np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **raw)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_arrays(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    """The arrays `write_arrays` wrote (`SaveDamagedError` when the file or the manifest
    does not hold them)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[m["key"]].view(jnp.dtype(m["dtype"])).reshape(
                tuple(m["shape"])) for name, m in manifest.items()}
    except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError
        raise SaveDamagedError(f"{path}: unreadable arrays ({type(e).__name__}: {e})") from e


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
