"""Locks of a run directory (``filelock``): one per (shard, number of shards), one for the run's
identity and manifests, one for the report.

A shard started twice (a SLURM requeue while the first job still runs, a double submission)
would otherwise write every row twice. The second process waits up to ``lock_timeout`` seconds,
then refuses with a message naming the holder (host, pid, start time, written beside the lock).
The operating system releases a lock when its process dies, so a requeued job after a crash
proceeds at once.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.store import shard_folder


class LockBusyError(RuntimeError):
    """Another process holds the lock; the message names it."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('since_utc')}"
    except (OSError, ValueError):
        return "holder unknown"


@contextmanager
def held(run_dir: str | os.PathLike, name: str, timeout: float = 0.0, what: str = "") -> Iterator[None]:
    """Hold ``RUN/locks/<name>.lock`` for the duration, or raise :class:`LockBusyError`."""
    locks = Path(run_dir) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{name}.lock"))
    info = locks / f"{name}.holder.json"
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise LockBusyError(
            f"{what or name} of {run_dir} is held by another process ({_holder(info)}); waited {timeout:g} s "
            "(lock_timeout). If that process is gone, the lock is released with it: run again."
        ) from None
    try:
        info.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        yield
    finally:
        lock.release()


def shard_lock(run_dir: str | os.PathLike, shard: int, num_shards: int, timeout: float = 0.0):
    """The lock of one shard's stages (load to compact)."""
    return held(run_dir, shard_folder(shard, num_shards), timeout, what=f"shard {shard} of {num_shards}")


def run_lock(run_dir: str | os.PathLike, timeout: float = 60.0):
    """The lock around the identity check and the manifests (held for milliseconds)."""
    return held(run_dir, "run", timeout, what="the run's identity")


def report_lock(run_dir: str | os.PathLike, timeout: float = 0.0):
    """The lock of the report stage (one report written at a time)."""
    return held(run_dir, "report", timeout, what="the report")
