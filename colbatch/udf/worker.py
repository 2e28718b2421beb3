"""What runs inside a UDF worker: loading the user's function once, calling it, and the process loop.

A UDF is either a function `fn(df) -> df` or a class whose instances are such
functions; a class is instantiated once per worker (process, thread or Dask
worker), so its `__init__` can open a connection or load a model once.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from colbatch.lazy import cloudpickle
import polars as pl

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

# Worker-side cache of loaded functions, keyed by the UDF's token: a process that serves
# many batches (a Dask or ProcessPool worker) unpickles and instantiates the UDF only once.
_LOADED: dict[str, Callable[[pl.DataFrame], Any]] = {}
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Failure:
    """The user's function raised: what, as text, because the exception itself may not pickle."""

    error_type: str
    message: str
    traceback: str


def function_name(fn: Any) -> str:
    """A readable `module:qualname` for a function, class or callable object."""
    target = fn if isinstance(fn, type) or hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def instantiate(fn: Any) -> Callable[[pl.DataFrame], Any]:
    """The callable to run batches with: a class is instantiated (its `__init__` runs here)."""
    return fn() if isinstance(fn, type) else fn


def load(token: str, blob: bytes) -> Callable[[pl.DataFrame], Any]:
    """Unpickle and instantiate the UDF once per process, then reuse it."""
    with _LOAD_LOCK:
        fn = _LOADED.get(token)
        if fn is None:
            fn = _LOADED[token] = instantiate(cloudpickle.loads(blob))
        return fn


def call(fn: Callable[[pl.DataFrame], Any], df: pl.DataFrame) -> pl.DataFrame | Failure:
    """Call the user's function; its exceptions and wrong return types become a Failure."""
    try:
        out = fn(df)
    except Exception as exc:  # any exception of the user's code is data, not a crash of ours
        return Failure(type(exc).__name__, str(exc), traceback.format_exc(limit=-8))
    if not isinstance(out, pl.DataFrame):
        return Failure("TypeError", f"the function must return a polars DataFrame, got `{type(out).__name__}`", "")
    return out


def run_ipc_task(token: str, blob: bytes, data: bytes) -> bytes | Failure:
    """Entry point on a generic executor (ProcessPoolExecutor, Dask): IPC bytes in, IPC bytes out."""
    from colbatch.udf.transport import from_ipc_bytes, to_ipc_bytes

    result = call(load(token, blob), from_ipc_bytes(data))
    return result if isinstance(result, Failure) else to_ipc_bytes(result)


def process_main(conn: Connection) -> None:
    """Loop of a pool worker process: receive a task naming two segments, answer with a small message.

    The first message is the pickled function. Then messages in: `(task_id, in_name, in_bytes, out_name, out_capacity)`, a new
    output segment `("segment", out_name, out_capacity)` after a "grow" answer, or None to
    exit. Answers: `("ok", task_id, out_bytes, fn_cpu_s, transport_cpu_s)`,
    `("error", task_id, Failure)`, `("grow", task_id, bytes_needed)`. The driver
    sends a busy worker its next task ahead of time, so a task can arrive while
    the worker waits for a new segment: it is kept and run next.
    """
    from colbatch.udf.transport import attach, ipc_size, read_ipc, to_arrow, write_ipc

    # Ctrl-C is the driver's to handle; a worker interrupted mid-batch would look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fn = instantiate(cloudpickle.loads(conn.recv_bytes()))
    conn.send(("ready",))  # a task's timeout runs from here: start-up is not the user's function
    segments: dict[str, Any] = {}

    def segment(name: str):
        if name not in segments:
            segments[name] = attach(name)
        return segments[name]

    waiting: collections.deque = collections.deque()  # tasks that arrived while a segment was awaited
    recent: collections.deque = collections.deque(maxlen=2)  # the segments of the last two tasks

    while True:
        if waiting:
            msg = waiting.popleft()
        else:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
        if msg is None:
            return
        task_id, in_name, in_bytes, out_name, out_capacity = msg
        # CPU seconds of this thread: a worker descheduled while the driver and the other workers
        # share the cores would count that wait as transport in wall time.
        t0 = time.thread_time()
        df = read_ipc(segment(in_name).buf, in_bytes, copy=False)
        t1 = time.thread_time()
        out = call(fn, df)
        t2 = time.thread_time()
        if isinstance(out, Failure):
            conn.send(("error", task_id, out))
            continue
        table = to_arrow(out)
        need = ipc_size(table)
        if need > out_capacity:
            conn.send(("grow", task_id, need))
            while (reply := conn.recv())[0] != "segment":
                waiting.append(reply)
            _, out_name, out_capacity = reply
        written = write_ipc(table, segment(out_name).buf)
        del df, out, table
        # Tasks alternate between two pairs of segments: the last two tasks' are the live ones.
        recent.append((in_name, out_name))
        _forget_stale(segments, keep=tuple(name for pair in recent for name in pair))
        conn.send(("ok", task_id, written, t2 - t1, (t1 - t0) + (time.thread_time() - t2)))


def _forget_stale(segments: dict[str, Any], keep: tuple[str, ...]) -> None:
    """Close segments the driver replaced (it unlinks them); a still-exported one is just dropped."""
    for name in [n for n in segments if n not in keep]:
        try:
            segments.pop(name).close()
        except BufferError:
            pass


