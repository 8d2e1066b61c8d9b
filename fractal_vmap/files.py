"""Files that a reader can trust: written atomically (temp file + rename), strict JSON (null, never NaN), and paths
checked for writability before any work is done."""

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fractal_vmap.errors import DiskFull, UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def space_for(path: Path):
    """Around a write of `path`: out of space, one DiskFull line naming the file and the space left (no traceback)."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        free = human_bytes(shutil.disk_usage(path.parent).free)
        why = os.strerror(e.errno).lower()
        raise DiskFull(f"cannot write {path}: {why} ({free} free in {path.parent}): free some space") from None


STALE_TEMPS = (".*.tmp-[0-9]*", ".tmp-[0-9]*-*")  # write_atomic's and atomic_path's temp names


def remove_stale_temps(directory: Path) -> int:
    """Delete the temp files an interrupted write left in `directory` (call it only where no other writer can be, under
    the run dir's lock). Returns how many."""
    stale = {p for pattern in STALE_TEMPS for p in Path(directory).glob(pattern) if p.is_file()}
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees a half-written file, and a failed write
    leaves no temp file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with space_for(path):
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite_or_none(obj):
    """A JSON-ready copy of obj with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, indent: int | None = 2) -> str:
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """A JSON file that must hold an object: one UserError line naming the file and the fix otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} ({what}) is not valid JSON ({type(e).__name__}): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} ({what}) holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def check_writable_dir(path: Path, flag: str) -> None:
    """A dir we are about to create or write into: not a file, and writable (its nearest existing ancestor if new)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory: pass a directory path")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a directory: pass a path you can write to")
    try:  # the real test (os.access says yes to root even on a read-only mount)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot write in {existing} ({e.strerror}): pass a path you can write to"
        ) from None


def check_writable_file(path: Path, flag: str) -> None:
    """A file we will write at the end of the work: checked now so the work is not lost."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: pass a file path such as {path / 'result.json'}")
    check_writable_dir(path.parent, f"{flag} {path}: its directory")


@contextmanager
def atomic_path(path: Path):
    """A temp path beside `path` to write to (by a library that wants a path); renamed onto `path` on success."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix: savefig picks the format by it
    try:
        with space_for(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
