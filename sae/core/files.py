"""Every file the framework writes goes through here, under one policy.

- Atomic and durable: a file is written under a temporary name beside its target, fsynced, renamed
  into place, and the folder fsynced; a crash leaves the old version or the new one, never half of
  one that looks complete.
- Nothing the user made is destroyed: an output folder is written only when it is new, empty, or
  holds an earlier output of the same kind (recognised by its own files), and that earlier output
  is replaced in one rename. Anything else is refused before a byte is written.
- Permissions follow the umask: tempfile and safetensors create private 0600 files and 0700
  folders, which would make a cache or dictionary on a shared disk unreadable by teammates.
- One writer per output: `lock_dir` takes an OS lock (flock) on the folder itself, so no lock file
  is left behind and a killed process never blocks its own resume.
- Failures a user can cause (disk full, permissions) surface as one-line `OutputError`s.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from safetensors.torch import save_file


class OutputError(ValueError):
    """A target that cannot or must not be written: one line saying what and where. `os_reason` is
    the operating system's own words when an OS error caused it (e.g. "No space left on device")."""

    def __init__(self, message: str, os_reason: str | None = None):
        super().__init__(message)
        self.os_reason = os_reason


class BusyError(OutputError):
    """Another live process holds the lock on an output folder."""


def umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def _public(path: Path, folder: bool = False):
    """Give `path` the mode open()/mkdir() would have given it under the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(e: BaseException) -> str:
    """An error's message cut to its first line (one-line errors), or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_os_error(e: BaseException) -> str:
    """A short reason for an OSError or a writer's error that wraps one (safetensors' does)."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "disk full"
    if getattr(e, "errno", None) in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return "permission denied"
    if getattr(e, "strerror", None):
        return e.strerror[0].lower() + e.strerror[1:]
    return first_line(e)


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Atomically create or replace the file `path` with what `write(tmp_path)` writes."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; cannot write a file there", os_reason=os.strerror(errno.EISDIR))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _public(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OutputError) or not _is_write_failure(e):
            raise
        raise OutputError(f"cannot write {path}: {describe_os_error(e)}", getattr(e, "strerror", None)) from None
    return path


def _is_write_failure(e: BaseException) -> bool:
    # safetensors raises its own SafetensorError (not an OSError) when the disk is full
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def write_bytes(path, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_result(path, obj) -> Path:
    """An evaluation's JSON result: its folder made if needed, then written atomically."""
    make_dirs(Path(path).parent)
    return write_json(path, obj, indent=1)


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---- output folders -----------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, kind: str, recognise: Callable[[Path], bool]) -> str:
    """Whether `path` may receive an output of `kind`: "new" (absent), "empty", or "previous" (it
    holds an earlier output that `recognise` knows). Anything else raises OutputError; nothing is
    touched either way."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise OutputError(f"{path} is a broken symbolic link; choose another {kind} folder")
        return "new"
    if not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder; choose another {kind} folder")
    try:
        entries = list(path.iterdir())
    except PermissionError:
        raise OutputError(f"{path}: permission denied") from None
    if not entries:
        return "empty"
    if recognise(path):
        return "previous"
    shown = ", ".join(sorted(p.name for p in entries)[:4]) + (", ..." if len(entries) > 4 else "")
    raise OutputError(f"{path} holds files that are not a {kind} ({shown}); choose a new or empty folder")


def only_files(path: Path, allowed: Iterable[str]) -> bool:
    """True when every entry of the folder `path` is one of `allowed` names (files or folders)."""
    allowed = set(allowed)
    return all(p.name in allowed for p in path.iterdir())


def make_dirs(path: Path):
    """mkdir -p, with one-line errors for the usual causes."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{path} (or a folder above it) exists and is not a folder") from None
    except OSError as e:
        raise OutputError(f"cannot create {path}: {describe_os_error(e)}") from None


@contextlib.contextmanager
def replacing_dir(path: str | os.PathLike, kind: str, recognise: Callable[[Path], bool]):
    """Build an output folder under a temporary name and move it to `path` in one rename.

        with replacing_dir(out, "dictionary", is_dictionary) as tmp:
            ... write files into tmp ...

    `path` must be new, empty, or an earlier output (see check_output_dir); that earlier output is
    swapped out only once the new one is complete, then removed."""
    path = Path(path)
    check_output_dir(path, kind, recognise)
    make_dirs(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe_os_error(e)}") from None
    try:
        _public(tmp, folder=True)
        yield tmp
        for f in tmp.rglob("*"):  # writers such as safetensors create private files
            _public(f, folder=f.is_dir())
            if f.is_file():
                fsync_path(f)
        check_output_dir(path, kind, recognise)  # still true now that we are about to swap
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError) or not _is_write_failure(e):
            raise
        raise OutputError(f"cannot write {path}: {describe_os_error(e)}; nothing there was changed") from None


# ---- one writer per output ----------------------------------------------------------------------
class DirLock:
    """An exclusive flock on a folder, held while a process writes into it.

    The lock lives on the folder's open descriptor, not in a file, so it vanishes with the process
    (even after SIGKILL) and leaves nothing behind. A second writer gets BusyError at once. Within
    one process the lock is re-entrant (the binding recipe locks a run folder whose last phase
    trains in it again): flock would otherwise refuse the process its own second descriptor."""

    _held: dict[tuple[int, int], int] = {}  # (device, inode) -> depth, for this process

    def __init__(self, path: str | os.PathLike, what: str, hint: str = ""):
        self.path, self.what, self.hint, self.fd, self.key = Path(path), what, hint, None, None

    def acquire(self) -> DirLock:
        make_dirs(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except NotADirectoryError:
            raise OutputError(f"{self.path} exists and is not a folder") from None
        except PermissionError:
            raise OutputError(f"{self.path}: permission denied") from None
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)
        if self._held.get(self.key):
            os.close(fd)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BusyError(f"{self.path} is in use by another process writing {self.what}; "
                                f"wait for it to finish{self.hint}") from None
            self.fd = fd
        self._held[self.key] = self._held.get(self.key, 0) + 1
        return self

    def release(self):
        if self.key is None:
            return
        self._held[self.key] -= 1
        if not self._held[self.key]:
            del self._held[self.key]
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = self.key = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
