"""The ground floor: atomic files and folders and JSON, created with the user's umask like any other tool.

Readers never see half a file or half a folder: everything is written next to its target under a temporary
name and renamed into place (`os.replace`) when complete. The temp names come from `tempfile`, which creates
them private (0600 / 0700); they are widened to the umask's defaults (`0o666 & ~umask` / `0o777 & ~umask`)
before the rename. `folder_lock` keeps a second process from writing a folder another one is writing.
This module imports nothing from recalign.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import socket
import time
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["umask", "file_mode", "dir_mode", "atomic_path", "write_atomic", "write_bytes_atomic", "write_json",
           "json_default", "atomic_folder", "make_dirs", "read_json", "append_log", "LOCK_NAME", "FolderBusyError",
           "folder_lock"]


def umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """Permissions of a new file under the current umask (usually 0o644)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Permissions of a new folder under the current umask (usually 0o755)."""
    return 0o777 & ~umask()


def make_dirs(folder: str | os.PathLike) -> Path:
    """`mkdir -p` (umask permissions); returns the folder as a Path."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file name next to `path`; whatever the block writes there replaces `path` when the block succeeds.

    For writers that want a file name (torch.save, np.save, matplotlib): `with atomic_path(p) as tmp: save(x, tmp)`.
    """
    target = Path(path)
    make_dirs(target.parent)
    # the temp name ends with the target's suffix, so writers that add one (np.save: ".npy") keep this name
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to `path` atomically (temp file in the same folder, then a rename)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to `path` atomically (temp file in the same folder, then a rename)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value stored in `path` (the reader beside `write_json`; errors are the caller's to word)."""
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def json_default(value: Any) -> Any:
    """JSON for NumPy/torch scalars and arrays and for paths (duck-typed, so numpy/torch are not imported here)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() == 1 and hasattr(value, "item"):
        return value.item()  # a one-element tensor is a number, as a scalar would be
    if hasattr(value, "tolist"):
        return value.tolist()  # numpy scalars -> int/float, arrays and tensors -> nested lists
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Atomically write `value` as JSON (pretty by default, with a final newline)."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=default or json_default)
    return write_atomic(path, text + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True, fixed_tmp: bool = False) -> Iterator[Path]:
    """A temp folder next to `path` to fill; renamed to `path` when the block succeeds, removed when it fails.

    With `replace` an existing `path` is replaced (renamed aside, and removed once the new folder is in place, so a
    failed rename leaves it as it was); else it is an error (FileExistsError).
    With `fixed_tmp` the temp folder is always `.<name>.tmp`, so the leftover of a killed attempt is removed by the
    next one (only for folders a single process writes, such as a run's stages).
    """
    target = Path(path)
    make_dirs(target.parent)
    if fixed_tmp:
        tmp = target.parent / f".{target.name}.tmp"
        for leftover in [tmp, *target.parent.glob(f".{glob.escape(target.name)}.*.old")]:  # of a killed attempt
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        _rename_into_place(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, target: Path, replace: bool) -> None:
    """Rename the folder `tmp` to `target`. An existing `target` is first renamed aside (a rename needs no disk
    space) and removed only once `tmp` is in place; when that rename fails (disk full) it is put back."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not replace:
        raise FileExistsError(17, "already exists", str(target))
    old = target.parent / f".{target.name}.{os.urandom(4).hex()}.old"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why `path` (a file or folder to create or replace) cannot be written, or None when it looks writable.

    Checks the nearest existing ancestor: it must be a folder we may write into. Cheap, so commands can refuse
    before doing any work; the write itself may still fail (disk full), which callers report the same way.
    """
    try:
        target = Path(os.path.abspath(path))
        if target.exists() and not os.access(target, os.W_OK):
            return "permission denied"
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            if parent.is_symlink():
                return f"{parent} is a broken link"
            parent = parent.parent
        if not parent.is_dir():
            return f"{parent} is not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{parent} is not writable"
    except (OSError, ValueError) as exc:  # a name too long, a link loop, a NUL byte
        return getattr(exc, "strerror", None) or str(exc)
    return None


def append_log(run_dir: Path, message: str) -> None:
    """Append one timestamped line to run_dir/log.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "a", encoding="utf-8") as out:
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


# ---- folder locks: one writing process per run folder or --out ------------------------------------------------

LOCK_NAME = ".lock"  # inside the locked folder; holds {"pid", "host", "started", "what"} of its holder
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # file systems without flock


class FolderBusyError(Exception):
    """`folder_lock` found the folder held by another live process; the message (one line) names that process."""

    def __init__(self, path: Path, holder: dict):
        started = holder.get("started", "at an unknown time")
        self.reason = (f"in use by another recalign {holder.get('what', 'command')} (pid {holder.get('pid', '?')} on "
                       f"{holder.get('host', '?')}, started {started}); wait for it to finish or choose another --out")
        super().__init__(f"{path}: {self.reason}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold `path` (created when missing) for this process while the block runs: another `folder_lock` on it
    meanwhile raises FolderBusyError naming this process (pid, host, start time, `what` it does).

    The lock is a `flock` on `path`/.lock, which the kernel drops when its process dies (even by kill -9), so a lock
    left by a dead process is simply taken over. On exit the lock file is removed, and `path` too (with the parents
    it needed) when this call created it and nothing was written into it.
    """
    folder = Path(path)
    created = []  # the folders make_dirs creates, deepest first
    for missing in (folder, *folder.parents):
        if missing.exists() or missing.is_symlink():
            break
        created.append(missing)
    make_dirs(folder)
    lock = folder / LOCK_NAME
    handle = _acquire(lock, what)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            if _same_file(handle, lock):  # not a lock file another process made after ours was removed
                lock.unlink()
        os.close(handle)
        with contextlib.suppress(OSError):
            for missing in created:
                missing.rmdir()  # only when empty


def _acquire(lock: Path, what: str) -> int:
    """An open descriptor of `lock` holding its flock, with this process written into it."""
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise FolderBusyError(lock.parent, _holder(lock)) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKING:
                os.close(handle)
                raise
            break  # this file system cannot lock: go on unlocked, as before locks existed
        if _same_file(handle, lock):
            break
        os.close(handle)  # the holder removed the file between our open and flock: lock the new one
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "what": what}
    with contextlib.suppress(OSError):  # best effort (a full disk): the flock alone is the lock
        os.ftruncate(handle, 0)
        os.pwrite(handle, (json.dumps(holder) + "\n").encode("utf-8"), 0)
    return handle


def _same_file(handle: int, path: Path) -> bool:
    try:
        mine, named = os.fstat(handle), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _holder(lock: Path, attempts: int = 20) -> dict:
    """Who holds `lock`, as it wrote itself there (the holder writes just after locking: retried briefly)."""
    for attempt in range(attempts):
        try:
            holder = read_json(lock)
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}
