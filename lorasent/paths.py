"""Where lorasent keeps its cache, and write-then-rename so no reader ever sees a half-written file or folder.

Many Ray trials on one node share one cache; an interrupted run must leave the previous good state. Every
write therefore goes to a temporary sibling first and is renamed into place only once it is complete
(a rename within one filesystem is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from lorasent.errors import ConfigError

CACHE_ENV = "LORASENT_CACHE"
# A lorasent model folder's record (each checkpoint's too): its arguments, metrics and epochs. Named here, where a
# trial process or the analysis reads it without importing torch (lorasent.model writes it).
META_FILE = "lorasent.json"


def check_writable(path: str | os.PathLike[str], fix: str) -> None:
    """Refuse `path` where it cannot be written: a file stands where a folder on its way must be, or the folder it goes
    in is not this user's to write. Checked before the work whose result it holds, not once that work is done."""
    where = next(p for p in Path(path).absolute().parents if p.exists())  # where it, or the folders to make, go
    if not where.is_dir():
        raise ConfigError(f"Cannot write {path}: {where} is a file, not a folder. {fix}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot write {path}: {where} is not writable. {fix}")


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: `override`, else $LORASENT_CACHE, else ~/.cache/lorasent; created if missing."""
    root = Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorasent").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"Cannot create the lorasent cache folder {root}: {e}. Point {CACHE_ENV} (or --cache_dir) at a "
            "writable folder."
        ) from e
    return root


# A write the cache cannot take: no room (disk, quota, file size limit) or no permission (read-only, not the user's)
_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def unwritable_cache(folder: Path, what: str, error: OSError) -> ConfigError:
    """The error for a cache that cannot take `what`, naming the folder and the fix."""
    return ConfigError(
        f"Cannot write {what} to {folder}: {error.strerror or error}. Point {CACHE_ENV} (or --cache_dir) at a "
        "writable folder with room for them."
    )


@contextlib.contextmanager
def cache_writes(folder: Path, what: str) -> Iterator[None]:
    """Writes into the cache whose failure for want of room or permission is `unwritable_cache`, not an OSError
    (or a Rust library's I/O error, such as safetensors' "I/O error: File too large (os error 27)")."""
    try:
        yield
    except Exception as e:
        code = e.errno if isinstance(e, OSError) else _rust_errno(str(e))
        if code not in _UNWRITABLE:
            raise
        raise unwritable_cache(folder, what, OSError(code, os.strerror(code))) from e


def _rust_errno(message: str) -> int | None:
    """The errno in a Rust `std::io::Error`'s text, which ends "(os error N)"."""
    found = re.search(r"\(os error (\d+)\)", message)
    return int(found.group(1)) if found else None


def _temp_sibling(final: Path, kind: str) -> Path:
    # Hidden, unique and in the same folder, so the final rename never crosses filesystems.
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` only if the block succeeds.

    On failure the temporary folder is deleted and `final` is untouched. If `final` already exists, it is
    replaced (old moved aside, new renamed in, old deleted) when `replace` is true; otherwise the existing
    folder wins and the new one is discarded — the right rule for content-keyed caches, where two writers
    racing on one key produce the same content and readers must never see the key vanish.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _commit_dir(tmp, final, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(final: str | os.PathLike[str]) -> None:
    """Delete the temporary and moved-aside folders that writers of `final` killed mid-write left behind (a
    partial cache can be gigabytes). Only a caller that alone may write `final` (holding its lock) may call this."""
    final = Path(final)
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _commit_dir(tmp: Path, final: Path, *, replace: bool) -> None:
    # A concurrent writer may commit between our checks, so retry a few times instead of trusting one look.
    for _ in range(5):
        old: Path | None = None
        if final.exists():
            if not replace:
                return
            old = _temp_sibling(final, "old")
            try:
                final.rename(old)
            except FileNotFoundError:  # another writer moved it first: look again
                continue
        try:
            tmp.rename(final)
            return
        except OSError as e:
            # Another writer put its folder in place after our look (and may move it aside again): look again.
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"Could not move {tmp} into place at {final}: other writers kept replacing it.")


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through a flushed temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
