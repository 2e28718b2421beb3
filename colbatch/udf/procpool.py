"""A crash-safe pool of UDF worker processes fed through reused shared-memory segments.

Unlike `concurrent.futures.ProcessPoolExecutor`, a worker that dies (SIGKILL,
segfault, out of memory) or overruns its timeout fails only its own task: the
slot is refilled with a fresh process when next needed and the pool goes on.
One dispatcher thread owns all workers; it waits on their sockets (a dead
worker's reads as end-of-file) and a wake-up pipe, so nothing polls and
nothing can hang.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing as mp
import socket
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import polars as pl

from colbatch import procs
from colbatch.udf import zygote
from colbatch.udf.transport import Segment, ipc_size, to_arrow, write_ipc
from colbatch.udf.worker import Failure

# Seconds a worker gets to exit after being asked before it is killed at shutdown.
DEFAULT_EXIT_GRACE_S = 2.0
# Extra seconds a new worker gets to start (interpreter, imports, a class UDF's __init__) before its
# first task's timeout runs: on a loaded machine start-up alone can take longer than a short timeout.
DEFAULT_START_GRACE_S = 60.0


log = logging.getLogger("colbatch")


def _fork_worker(data: socket.socket) -> zygote.ForkedWorker | None:
    """A worker forked from the zygote, or None to start a fresh interpreter instead.

    A zygote that cannot fork (it failed to start or died mid-request) is logged once and not
    used again in this process: every later worker starts as a fresh interpreter.
    """
    global _zygote_failed
    if _zygote_failed or not zygote.enabled():
        return None
    try:
        return zygote.ZYGOTE.fork(data)
    except (OSError, RuntimeError) as exc:
        _zygote_failed = True
        log.warning("UDF workers start as fresh interpreters from now on: the worker zygote failed (%s)", exc)
        return None


_zygote_failed = False


def prestart_zygote() -> None:
    """Start the zygote ahead of a pool's first worker (see `zygote.prestart`), unless it failed before."""
    if not _zygote_failed:
        zygote.prestart()


class WorkerLost(Exception):
    """A worker process died while running a task (killed, crashed, out of memory)."""


class TaskTimeout(Exception):
    """A task ran longer than the pool's timeout; its worker was killed."""


class PoolBroken(RuntimeError):
    """The pool's dispatcher thread failed (a bug of colbatch's, not of the user's function).

    Every task in flight or queued fails with it and later submits raise it: without a
    dispatcher nothing would ever answer them, and a retried batch would wait forever.
    """


@dataclass
class PoolStats:
    """Where the pool's time went: the user's function vs moving data, in seconds.

    The workers' figures are CPU seconds of their main thread (the function's own
    threads, if it starts any, are not counted); the driver's is wall time.
    """

    tasks: int = 0
    fn_cpu_s: float = 0.0
    worker_transport_cpu_s: float = 0.0
    driver_transport_s: float = 0.0
    workers_started: int = 0
    workers_lost: int = 0


@dataclass
class _Task:
    id: int
    df: pl.DataFrame
    future: Future
    started: float = 0.0
    pair: int = 0  # which of its slot's two segment pairs holds the input and will hold the result
    nbytes: int = 0  # bytes of the input's IPC stream in that pair's input segment


@dataclass
class _Slot:
    process: subprocess.Popen | zygote.ForkedWorker | None = None
    conn: Connection | None = None
    # Two pairs of (input, output) segments, used by alternate tasks: the next task's input is
    # written while the worker runs the current one, and a result is read before its pair is reused.
    inp: list[Segment | None] = field(default_factory=lambda: [None, None])
    out: list[Segment | None] = field(default_factory=lambda: [None, None])
    # The task the worker runs first, then at most one sent ahead of time, in the order sent.
    tasks: collections.deque[_Task] = field(default_factory=collections.deque)
    ready: bool = False  # the worker said it loaded the function

    def alive(self) -> bool:
        """Whether the slot has a worker process that has not ended."""
        return self.process is not None and self.process.poll() is None


class ProcessPool:
    """Runs `fn(df)` on `workers` processes; `submit` returns a Future of a DataFrame or a failure.

    Each busy worker also holds its next task: it starts that one as soon as it
    has answered the current one, without waiting for the driver to read the
    answer and write more input (a few milliseconds per batch otherwise).

    A task's future raises `WorkerLost` or `TaskTimeout` when its worker is
    lost, and resolves to a `Failure` when the user's function raised.
    """

    def __init__(self, blob: bytes, workers: int, *, timeout: float | None = None) -> None:
        self._blob = blob
        self._timeout = timeout
        self._slots = [_Slot() for _ in range(workers)]
        self._queue: collections.deque[_Task] = collections.deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._closed = False
        self._broken: PoolBroken | None = None
        self._thread: threading.Thread | None = None
        self.stats = PoolStats()

    # -- public -----------------------------------------------------------------------------

    def submit(self, df: pl.DataFrame) -> Future:
        """Queue one batch; workers and the dispatcher start on first use."""
        fut: Future = Future()
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise RuntimeError("the process pool is shut down")
            self._queue.append(_Task(next(self._ids), df, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="colbatch-udf-pool", daemon=True)
                self._thread.start()
        self._wake_w.send_bytes(b"")
        return fut

    def shutdown(self) -> None:
        """Stop workers (kill the ones that do not exit), fail queued tasks, unlink every segment."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send_bytes(b"")
        if self._thread is not None:
            self._thread.join()
        else:
            self._close_all()

    @property
    def live_workers(self) -> list[int]:
        """Process ids of the workers alive now."""
        return [s.process.pid for s in self._slots if s.alive()]

    # -- dispatcher -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                self._assign()
                waitables: list = [self._wake_r]
                for slot in self._slots:
                    if slot.tasks:
                        waitables.append(slot.conn)  # a dead worker's socket reads as EOF
                for ready in wait(waitables, timeout=self._next_deadline()):
                    if ready is self._wake_r:
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                for slot in self._slots:
                    if slot.tasks:
                        self._service(slot)
        except BaseException as exc:  # ours, not the user's: fail every task instead of leaving it unanswered
            broken = PoolBroken(f"the UDF process pool's dispatcher failed: {type(exc).__name__}: {exc}")
            broken.__cause__ = exc
            with self._lock:
                self._broken, self._closed = broken, True
        finally:
            self._close_all()

    def _next_deadline(self) -> float | None:
        if self._timeout is None:
            return None
        deadlines = [self._deadline(s) for s in self._slots if s.tasks]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.perf_counter())

    def _deadline(self, slot: _Slot) -> float:
        # The clock runs for the task the worker is on, the first one sent; the one after it waits.
        assert slot.tasks and self._timeout is not None
        return slot.tasks[0].started + self._timeout + (0.0 if slot.ready else DEFAULT_START_GRACE_S)

    def _assign(self) -> None:
        # Idle workers first, so that a short queue is spread over the workers, then one task
        # ahead for each busy worker whose process is alive.
        for held in (0, 1):
            for slot in self._slots:
                if len(slot.tasks) != held or (held and not slot.alive()):
                    continue
                with self._lock:
                    if not self._queue:
                        return
                    task = self._queue.popleft()
                if not task.future.set_running_or_notify_cancel():
                    continue
                try:
                    self._start_task(slot, task)
                except BaseException as exc:  # a failure to start a worker is ours, not the user's
                    if task in slot.tasks:
                        slot.tasks.remove(task)
                    task.future.set_exception(exc)

    def _start_task(self, slot: _Slot, task: _Task) -> None:
        if not slot.tasks and not slot.alive():
            self._start_worker(slot)
        task.pair = slot.tasks[0].pair ^ 1 if slot.tasks else 0
        t0 = time.perf_counter()
        table = to_arrow(task.df)
        need = ipc_size(table)
        inp = slot.inp[task.pair]
        if inp is None or need > inp.capacity:
            if inp is not None:
                inp.release()
            inp = slot.inp[task.pair] = Segment(need)
        task.nbytes = write_ipc(table, inp.shm.buf)
        del table
        if slot.out[task.pair] is None:
            slot.out[task.pair] = Segment(inp.capacity)
        self.stats.driver_transport_s += time.perf_counter() - t0
        task.df = None  # type: ignore[assignment]  # the segment has it now; free driver memory
        if not slot.tasks:
            task.started = time.perf_counter()
        slot.tasks.append(task)
        self._send_task(slot, task)

    def _send_task(self, slot: _Slot, task: _Task) -> None:
        out = slot.out[task.pair]
        assert out is not None
        slot.conn.send((task.id, slot.inp[task.pair].name, task.nbytes, out.name, out.capacity))

    def _start_worker(self, slot: _Slot) -> None:
        self._drop_worker(slot)
        # A plain interpreter on one end of a socket pair, not multiprocessing's spawn: spawn
        # re-runs the user's `__main__` script in every worker; the function travels pickled anyway.
        ours, theirs = socket.socketpair()
        try:
            proc = _fork_worker(theirs)
            forked = proc is not None
            if proc is None:
                proc = zygote.start_interpreter(theirs)
        finally:
            theirs.close()
        slot.process, slot.conn, slot.ready = proc, Connection(ours.detach()), False
        procs.forget()  # memory samplers count the new worker from their next sample
        if forked:
            zygote.send_context(slot.conn)
        slot.conn.send_bytes(self._blob)
        self.stats.workers_started += 1

    def _service(self, slot: _Slot) -> None:
        task = slot.tasks[0]
        if slot.conn.poll():
            try:
                msg = slot.conn.recv()
            except (EOFError, OSError):
                msg = None  # the worker is gone: the pipe closed with the process
                slot.conn.close()
            if msg is not None:
                self._answer(slot, task, msg)
                return
        # Answers the worker sent before it ended were read first: the task at the head is the one
        # it was running.
        if slot.process.poll() is not None or slot.conn.closed:
            code = slot.process.wait()
            self._lose(slot, WorkerLost(f"worker process died (exit code {code}) while running the batch"))
            return
        if self._timeout is not None and time.perf_counter() > self._deadline(slot):
            self._lose(slot, TaskTimeout(f"the batch ran longer than timeout={self._timeout:g}s"))

    def _lose(self, slot: _Slot, error: Exception) -> None:
        """Fail the worker's current task; the task sent ahead goes to a new worker in the same slot."""
        self.stats.workers_lost += 1
        self._drop_worker(slot)
        slot.tasks.popleft().future.set_exception(error)
        if slot.tasks:
            try:
                self._start_worker(slot)
                slot.tasks[0].started = time.perf_counter()
                self._send_task(slot, slot.tasks[0])
            except BaseException as exc:  # ours: the task that never ran fails with it
                slot.tasks.popleft().future.set_exception(exc)

    def _answer(self, slot: _Slot, task: _Task, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            # The worker finished starting (imports, unpickling, a class's __init__): the task's clock starts now.
            slot.ready = True
            task.started = time.perf_counter()
            return
        if kind == "grow":
            old = slot.out[task.pair]
            if old is not None:
                old.release()
            out = slot.out[task.pair] = Segment(msg[2])
            slot.conn.send(("segment", out.name, out.capacity))
            return
        slot.tasks.popleft()
        if slot.tasks:
            slot.tasks[0].started = time.perf_counter()  # the worker went on to the task sent ahead
        if kind == "error":
            failure: Failure = msg[2]
            task.future.set_result(failure)
            return
        _, _, nbytes, fn_cpu_s, transport_cpu_s = msg
        t0 = time.perf_counter()
        df = slot.out[task.pair].read(nbytes)
        self.stats.driver_transport_s += time.perf_counter() - t0
        self.stats.tasks += 1
        self.stats.fn_cpu_s += fn_cpu_s
        self.stats.worker_transport_cpu_s += transport_cpu_s
        task.future.set_result(df)

    def _drop_worker(self, slot: _Slot) -> None:
        if slot.process is not None:
            if slot.process.poll() is None:
                slot.process.kill()
            slot.process.wait()
            slot.process = None
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None

    def _close_all(self) -> None:
        # Every idle worker is asked first, then waited for: they exit side by side (an interpreter
        # with Polars loaded takes ~0.1 s to finish), not one after the other at the job's end.
        asked = []
        for slot in self._slots:
            if slot.alive() and not slot.tasks:
                try:
                    slot.conn.send(None)
                    asked.append(slot.process)
                except (OSError, ValueError):
                    pass
        deadline = time.perf_counter() + DEFAULT_EXIT_GRACE_S
        for process in asked:
            try:
                process.wait(timeout=max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                pass  # killed below
        for slot in self._slots:
            while slot.tasks:
                self._abandon(slot.tasks.popleft().future)
            self._drop_worker(slot)
            for seg in (*slot.inp, *slot.out):
                if seg is not None:
                    seg.release()
            slot.inp, slot.out = [None, None], [None, None]
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for task in queued:
            self._abandon(task.future)

    def _abandon(self, future: Future) -> None:
        """End a task the pool will not run: with the dispatcher's failure, else cancelled (or lost, once running)."""
        if self._broken is not None:
            future.set_exception(self._broken)
        elif not future.cancel():
            future.set_exception(WorkerLost("the pool was shut down"))
