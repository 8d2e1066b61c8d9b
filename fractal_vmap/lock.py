"""One writer per run dir: a kernel file lock (flock) on run_dir/grid.lock, taken by the single process or by rank 0
and held while the grid runs. The kernel drops it when its holder exits, even by SIGKILL, so there is never a stale
lock to clear by hand. The holder writes its host and pid into the lock file, for the refusal to name."""

import errno
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path

from fractal_vmap.errors import UserError

LOCK_NAME = "grid.lock"


def write_holder(fd: int) -> None:
    """Called by filelock with the lock held: our host and pid, in place of the last holder's."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": platform.node(), "pid": os.getpid()}).encode(), 0)


def holder(path: Path) -> str:
    """'host H, pid P' of the lock's holder, as it wrote them."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:  # the holder has the lock but has not written yet: a window of microseconds
        return "host and pid not yet written"
    return f"host {data['host']}, pid {data['pid']}"


@contextmanager
def run_dir_lock(run_dir: Path):
    """Hold run_dir's lock for the duration of the block, or refuse with one line naming the holder."""
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    # fallback_to_soft=False: on a filesystem without flock, refuse rather than leave a marker a SIGKILL would orphan
    lock = FileLock(path, blocking=False, fallback_to_soft=False, preserve_lock_file=True, on_acquired=write_holder)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{run_dir} is being written by another grid ({holder(path)}): wait for it to end or stop it, "
            "then rerun; or pass another --run_dir"
        ) from None
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        raise UserError(
            f"{run_dir}: its filesystem has no file locks (flock): pass a --run_dir on one that has "
            "(a local disk; NFS; Lustre mounted with -o flock)"
        ) from None
    try:
        yield
    finally:
        lock.release()
