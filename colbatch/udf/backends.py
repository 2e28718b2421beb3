"""Where a UDF runs: inline, a thread pool, the crash-safe process pool, or any `concurrent.futures.Executor`.

Every backend has the same shape: `submit(df)` returns a Future that resolves
to the output DataFrame or to a `Failure` (the user's function raised), and
raises `WorkerLost` / `TaskTimeout` when the infrastructure lost the batch.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from typing import Any

from colbatch.lazy import cloudpickle
import polars as pl

from colbatch.errors import ConfigError, MissingDependencyError
from colbatch.udf.step import DASK_SCHEMES
from colbatch.udf.procpool import PoolStats, ProcessPool, WorkerLost
from colbatch.udf.transport import from_ipc_bytes, to_ipc_bytes
from colbatch.udf.worker import Failure, call, instantiate, run_ipc_task

EXECUTORS = ("inline", "threads", "processes")


class Backend:
    """Base class: runs the UDF on one DataFrame at a time, asynchronously."""

    #: True when the backend itself kills and reports a batch that overran its timeout.
    enforces_timeout = False
    stats: PoolStats | None = None

    def submit(self, df: pl.DataFrame) -> Future:
        """Start the UDF on `df`."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release workers; never waits for a hung user function."""


class InlineBackend(Backend):
    """Runs in the calling thread; the future is done when `submit` returns."""

    def __init__(self, fn: Any) -> None:
        self._fn = instantiate(fn)

    def submit(self, df: pl.DataFrame) -> Future:
        fut: Future = Future()
        fut.set_result(call(self._fn, df))
        return fut


class ThreadBackend(Backend):
    """A thread pool for I/O-bound UDFs; a class UDF gets one instance per thread."""

    def __init__(self, fn: Any, concurrency: int) -> None:
        self._fn = fn
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="colbatch-udf")

    def _run(self, df: pl.DataFrame) -> pl.DataFrame | Failure:
        inst = getattr(self._local, "fn", None)
        if inst is None:
            inst = self._local.fn = instantiate(self._fn)
        return call(inst, df)

    def submit(self, df: pl.DataFrame) -> Future:
        return self._pool.submit(self._run, df)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ProcessBackend(Backend):
    """colbatch's own process pool: shared-memory IPC transport, dead workers replaced."""

    enforces_timeout = True

    def __init__(self, fn: Any, workers: int, timeout: float | None) -> None:
        self._pool = ProcessPool(cloudpickle.dumps(fn), workers, timeout=timeout)
        self.stats = self._pool.stats

    def submit(self, df: pl.DataFrame) -> Future:
        return self._pool.submit(df)

    def shutdown(self) -> None:
        self._pool.shutdown()


class ExecutorBackend(Backend):
    """A user's `concurrent.futures.Executor` (ProcessPool, loky, Dask's `Client.get_executor()`).

    Batches travel as Arrow IPC bytes; the function is pickled once here and
    loaded once per worker process (see `worker.load`).
    """

    def __init__(self, fn: Any, executor: Executor, *, owned_client: Any = None) -> None:
        self._executor = executor
        self._blob = cloudpickle.dumps(fn)
        self._token = hashlib.sha1(self._blob).hexdigest()
        # A Dask Client this backend connected itself (from an address) and so must close; never the user's.
        self._client = owned_client

    def submit(self, df: pl.DataFrame) -> Future:
        out: Future = Future()
        try:
            inner = self._executor.submit(run_ipc_task, self._token, self._blob, to_ipc_bytes(df))
        except (BrokenExecutor, RuntimeError) as exc:
            out.set_exception(WorkerLost(f"the executor cannot run tasks: {exc}"))
            return out
        inner.add_done_callback(lambda f: _relay(f, out))
        return out

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _relay(inner: Future, out: Future) -> None:
    if inner.cancelled():
        out.set_exception(WorkerLost("the executor cancelled the batch"))
        return
    exc = inner.exception()
    if exc is not None:
        # Anything the executor raises is its worker dying (BrokenProcessPool, Dask's KilledWorker...):
        # the user's own exceptions come back as a Failure value, never as an exception.
        out.set_exception(WorkerLost(f"the executor lost the batch: {type(exc).__name__}: {exc}"))
        return
    res = inner.result()
    out.set_result(res if isinstance(res, Failure) else from_ipc_bytes(res))


def make_backend(fn: Any, executor: Any, *, workers: int, concurrency: int, timeout: float | None) -> Backend:
    """The backend for a `map_batches` executor choice."""
    if executor == "inline":
        return InlineBackend(fn)
    if executor == "threads":
        return ThreadBackend(fn, concurrency)
    if executor == "processes":
        return ProcessBackend(fn, workers, timeout)
    if isinstance(executor, Executor):
        return ExecutorBackend(fn, executor)
    if _is_dask_client(executor):
        return ExecutorBackend(fn, executor.get_executor(pure=False))
    if isinstance(executor, str) and executor.startswith(DASK_SCHEMES):
        client = dask_client(executor)
        return ExecutorBackend(fn, client.get_executor(pure=False), owned_client=client)
    raise ConfigError(f"`executor` must be one of {', '.join(EXECUTORS)}, a concurrent.futures.Executor or a "
                      f"dask.distributed.Client, got {executor!r}", value=repr(executor))


def _is_dask_client(obj: Any) -> bool:
    return type(obj).__module__.startswith("distributed") and hasattr(obj, "get_executor")


def dask_client(address: str) -> Any:
    """Connect to a Dask scheduler at `address` (`tcp://HOST:PORT`)."""
    try:
        from dask.distributed import Client
    except ImportError as exc:
        raise MissingDependencyError("a Dask executor needs the `dask` extra: pip install 'colbatch[dask]'") from exc
    return Client(address)
