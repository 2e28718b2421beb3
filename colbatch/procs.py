"""This process's descendants and their memory, cheaply.

psutil's `Process.children()` reads the parent of every process on the machine
(~1.4 ms with 140 processes, more on a busy host), and the samplers ask several
times a second. Linux lists each thread's children in
`/proc/PID/task/TID/children`: a few small files for this process's tree. Other
systems (or kernels without those files) fall back to psutil.
"""

from __future__ import annotations

import os

import psutil

_HAS_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


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


def descendant_pids(pid: int | None = None) -> list[int]:
    """Pids of the children of `pid` (default: this process), and theirs, recursively."""
    pid = os.getpid() if pid is None else pid
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
