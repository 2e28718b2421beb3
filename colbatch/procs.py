"""This process's descendants and their memory, cheaply.

psutil's `Process.children()` reads the parent of every process on the machine
(~1.4 ms with 140 processes, more on a busy host), and the samplers ask several
times a second. Linux lists each thread's children in
`/proc/PID/task/TID/children`: a few small files for this process's tree. Other
systems (or kernels without those files) fall back to psutil.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

_HAS_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")
# A process with many threads (a pool of 32 for an I/O-bound UDF) has as many `children` files:
# the list is read again at most this often; the RSS of known children is read every time.
CHILDREN_TTL_S = 1.0
_cache: dict[int, tuple[float, list[int]]] = {}
_cache_lock = threading.Lock()


def _child_pids(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                out.extend(int(p) for p in fh.read().split())
        except OSError:  # the thread or process ended meanwhile
            continue
    return out


def descendant_pids(pid: int | None = None, *, max_age_s: float = CHILDREN_TTL_S) -> list[int]:
    """Pids of the children of `pid` (default: this process), and theirs, recursively.

    A list read less than `max_age_s` ago is reused (children that ended since are skipped by the callers).
    """
    pid = os.getpid() if pid is None else pid
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(pid)
    if hit is not None and now - hit[0] < max_age_s:
        return list(hit[1])
    found = _scan(pid)
    with _cache_lock:
        _cache[pid] = (now, found)
    return list(found)


def forget() -> None:
    """Drop the cached lists: call after starting a child process, so the next sample counts it."""
    with _cache_lock:
        _cache.clear()


def _scan(pid: int) -> list[int]:
    if not _HAS_CHILDREN_FILES:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = _child_pids(todo.pop())
        found.extend(kids)
        todo.extend(kids)
    return found


def tree_rss(proc: psutil.Process | None = None) -> int:
    """RSS of `proc` (default: this process) and its descendants, in bytes."""
    proc = proc or psutil.Process()
    total = proc.memory_info().rss
    for pid in descendant_pids(proc.pid):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total
