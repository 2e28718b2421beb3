"""UDF worker processes started in milliseconds, forked from a pre-loaded zygote process.

A worker started as a fresh interpreter spends ~0.3–0.5 s of CPU before its
first batch (Python, Polars, pyarrow, NumPy), on every job: on 2 cores that is
a sixth of a 2M-row job. The zygote is one process per driver, started on the
first worker any pool needs (or ahead of it, by `prestart`) and kept until
the driver exits. It imports what every worker imports, sends one tiny frame
through the IPC path, and then only forks: it never runs a query on Polars'
thread pool nor starts a pool of its own, so its children start from a state
that forking keeps whole (Polars warns against forking a process whose thread
pool ran; this one's never did).

Each worker is still a fresh process for its job: the user's function and its
modules are loaded after the fork, from the pickled function the pool sends,
with the driver's current working directory, environment and `sys.path`, and
its output goes to the driver's current stdout and stderr. The zygote reaps
its children and reports each one's exit code to the driver through a pipe;
the driver signals a worker through a pidfd, which cannot reach another
process after the worker's pid is reused.

Set `COLBATCH_UDF_ZYGOTE=0` to start every worker as a fresh interpreter
instead. Off Linux (no pidfds), workers are always fresh interpreters.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from typing import NoReturn

# Environment variables read when Polars, pyarrow, NumPy or Python start: a zygote started before
# one of them changed would hand its workers the old setting, so it is restarted instead.
_IMPORT_TIME_ENV = ("POLARS_", "ARROW_", "OMP_", "OPENBLAS_", "MKL_", "RAYON_", "PYTHON", "MALLOC_", "LD_")
# Seconds to wait for the zygote to report a worker's pid or exit code before giving up on it.
_REPLY_TIMEOUT_S = 30.0
_CODE = struct.Struct("<q")
log = logging.getLogger("colbatch")
# The exit code reported when the zygote itself is gone and cannot say how a worker ended.
UNKNOWN_EXIT = -1


def enabled() -> bool:
    """Whether pools fork their workers from the zygote (Linux with pidfds, not switched off)."""
    return (os.environ.get("COLBATCH_UDF_ZYGOTE", "1") != "0" and hasattr(os, "pidfd_open")
            and hasattr(signal, "pidfd_send_signal") and hasattr(socket, "send_fds"))


# -- driver side ----------------------------------------------------------------------------------


class ForkedWorker:
    """A worker forked by the zygote, with the part of `subprocess.Popen`'s interface the pool uses."""

    def __init__(self, pid: int, status_fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status = status_fd
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # it ended and the zygote reaped it already: its exit code is on the pipe
            self._pidfd = None

    def poll(self) -> int | None:
        """The exit code once the process ended, else None (never blocks for a live worker)."""
        if self.returncode is None and (self._pidfd is None or _readable(self._pidfd, 0.0)):
            self._reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end; raises `subprocess.TimeoutExpired` after `timeout` seconds."""
        if self.returncode is None:
            if self._pidfd is not None and not _readable(self._pidfd, timeout):
                raise subprocess.TimeoutExpired(f"colbatch UDF worker {self.pid}", timeout or 0.0)
            self._reap()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the worker (a no-op once it ended)."""
        if self.returncode is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        # The process ended; the zygote reaps it and writes its exit code (EOF: the zygote is gone).
        data = _read_exact(self._status, _CODE.size, _REPLY_TIMEOUT_S)
        self.returncode = _CODE.unpack(data)[0] if data is not None else UNKNOWN_EXIT
        for fd in (self._pidfd, self._status):
            if fd is not None:
                os.close(fd)


class _Zygote:
    """The driver's handle on its zygote process: started on first use, restarted when it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ctrl: socket.socket | None = None
        self._env: dict[str, str] = {}

    def fork(self, data: socket.socket) -> ForkedWorker:
        """A new worker whose end of the pool's socket pair is `data`; it then waits for `send_context`.

        A zygote found dead (killed, or it exits while asked) is replaced and asked once more.
        """
        for attempt in (1, 2):
            with self._lock:
                self._ensure()
                status_r = self._request(data)
            reply = _read_exact(status_r, _CODE.size, _REPLY_TIMEOUT_S)
            if reply is not None:
                return ForkedWorker(_CODE.unpack(reply)[0], status_r)
            os.close(status_r)
            if attempt == 1 and self._died():
                continue
        raise RuntimeError("the UDF worker zygote did not fork a worker (it exited or hung)")

    def _request(self, data: socket.socket) -> int:
        """Ask the zygote for a fork; returns the pipe its pid and then its exit code arrive on."""
        assert self._ctrl is not None
        status_r, status_w = os.pipe()
        out, err = _stdio()
        try:
            socket.send_fds(self._ctrl, [b"f"], [data.fileno(), status_w, out, err])
        except OSError:
            # The zygote is gone: its end closed. The caller reads end-of-file and asks a new one.
            pass
        finally:
            for fd in (status_w, out, err):
                os.close(fd)
        return status_r

    def prestart(self) -> None:
        """Start the zygote now unless it runs; returns at once, while it loads in the background."""
        with self._lock:
            try:
                self._ensure()
            except OSError as exc:  # the first fork tries again and reports it
                log.debug("the UDF worker zygote did not start ahead of its first worker: %s", exc)

    def _died(self) -> bool:
        """Whether the zygote has ended (waits for it briefly: it closed our pipe, so it is exiting)."""
        with self._lock:
            if self._proc is None:
                return True
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                return False
            return True

    @property
    def pid(self) -> int | None:
        """The zygote's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def stop(self) -> None:
        """End the zygote (workers it forked run on until their pools end them)."""
        with self._lock:
            self._stop()

    def _ensure(self) -> None:
        """A running zygote started with today's import-time environment (the caller holds the lock)."""
        if self._stale():
            self._stop()
            self._start()

    def _stale(self) -> bool:
        return self._proc is None or self._proc.poll() is not None or _import_env() != self._env

    def _start(self) -> None:
        from colbatch import procs

        ours, theirs = socket.socketpair()
        try:
            self._proc = start_interpreter(theirs, "--zygote")
        finally:
            theirs.close()
        self._ctrl, self._env = ours, _import_env()
        procs.forget()

    def _stop(self) -> None:
        if self._ctrl is not None:
            self._ctrl.close()  # the zygote exits at end-of-file
            self._ctrl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _forget_after_fork(self) -> None:
        # A driver forked by the user's code gets a zygote of its own; the parent's stays the parent's.
        # The child's copy of the control socket is closed, or the parent's zygote would not see
        # end-of-file when the parent exits while the child lives on.
        self._lock = threading.Lock()
        if self._ctrl is not None:
            try:
                self._ctrl.close()
            except OSError:
                pass
        self._proc, self._ctrl, self._env = None, None, {}


ZYGOTE = _Zygote()
atexit.register(ZYGOTE.stop)
os.register_at_fork(after_in_child=ZYGOTE._forget_after_fork)


def prestart() -> None:
    """Start the zygote in the background ahead of the first worker a job will need.

    A job about to start a process pool calls this as early as it can: the
    zygote's imports (~0.2 s) then overlap the job's own start (the driver's
    imports, reading the first batches) instead of delaying the first batch.
    """
    if enabled():
        ZYGOTE.prestart()


def start_interpreter(end: socket.socket, *args: str) -> subprocess.Popen:
    """`python -m colbatch.udf [ARGS] FD` with the driver's environment and `sys.path`, `end` as FD."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", "colbatch.udf", *args, str(end.fileno())],
                            pass_fds=(end.fileno(),), env=env, stdin=subprocess.DEVNULL)


def send_context(conn) -> None:
    """Send a forked worker what a fresh interpreter would have inherited from the driver now."""
    conn.send_bytes(json.dumps([os.getcwd(), dict(os.environ), list(sys.path)]).encode())


def _import_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_IMPORT_TIME_ENV)}


def _stdio() -> tuple[int, int]:
    """Duplicates of the driver's stdout and stderr now (/dev/null for a closed one)."""
    fds = []
    for fd in (1, 2):
        try:
            fds.append(os.dup(fd))
        except OSError:
            fds.append(os.open(os.devnull, os.O_WRONLY))
    return fds[0], fds[1]


def _readable(fd: int, timeout: float | None) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _read_exact(fd: int, n: int, timeout: float) -> bytes | None:
    """`n` bytes from `fd`, or None at end-of-file or after `timeout` seconds."""
    data = b""
    while len(data) < n:
        if not _readable(fd, timeout):
            return None
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- zygote side ----------------------------------------------------------------------------------


def serve(ctrl_fd: int) -> None:
    """The zygote's loop: fork a worker per request, reap the workers, report their exit codes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    ctrl = socket.socket(fileno=ctrl_fd)
    _preload()
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, status pipe)
    while True:
        for fd in select.select([ctrl, *children], [], [])[0]:
            if fd is ctrl:
                try:
                    msg, fds, _, _ = socket.recv_fds(ctrl, 16, 4)
                except OSError:
                    msg, fds = b"", []
                if not msg:
                    return  # the driver closed its end or exited
                if len(fds) != 4:
                    for f in fds:
                        os.close(f)
                    continue
                _fork(ctrl, children, *fds)
            else:
                pid, status_w = children.pop(fd)
                _, status = os.waitpid(pid, 0)
                try:
                    os.write(status_w, _CODE.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass  # the driver stopped listening
                os.close(status_w)
                os.close(fd)


def _preload() -> None:
    """Import what every worker needs and warm the IPC path, without starting Polars' thread pool."""
    import numpy  # noqa: F401  (loaded by pyarrow and Polars' conversions anyway)
    import polars as pl
    import pyarrow.ipc  # noqa: F401

    from colbatch.lazy import cloudpickle
    from colbatch.udf import transport, worker  # noqa: F401

    cloudpickle.dumps  # noqa: B018  (imports the real module)
    frame = pl.DataFrame({"i": [1], "f": [1.5], "s": ["a"], "b": [True]})
    table = transport.to_arrow(frame)
    buf = memoryview(bytearray(transport.segment_size(transport.ipc_size(table))))
    transport.read_ipc(buf, transport.write_ipc(table, buf), copy=False)
    sys.stdout.flush()
    sys.stderr.flush()


def _fork(ctrl: socket.socket, children: dict[int, tuple[int, int]], data: int, status_w: int, out: int,
          err: int) -> None:
    pid = os.fork()
    if pid == 0:
        _child(ctrl, children, data, status_w, out, err)
    for fd in (data, out, err):
        os.close(fd)
    try:
        os.write(status_w, _CODE.pack(pid))
    except OSError:
        pass  # the driver gave up on this worker; it will see its socket close
    children[os.pidfd_open(pid)] = (pid, status_w)


def _child(ctrl: socket.socket, children: dict[int, tuple[int, int]], data: int, status_w: int, out: int,
           err: int) -> NoReturn:
    """A forked worker: drop the zygote's descriptors, take the driver's context, run the worker loop."""
    try:
        ctrl.close()
        for pidfd, (_, other_w) in children.items():
            os.close(pidfd)
            os.close(other_w)
        os.close(status_w)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        # Forked workers would all draw the same numbers from NumPy's global generator, had the
        # zygote loaded it (NumPy loads `numpy.random` on first use: then it seeds itself here).
        if "numpy.random" in sys.modules:
            sys.modules["numpy.random"].seed()
        from multiprocessing.connection import Connection

        from colbatch.exits import exit_quietly
        from colbatch.udf.worker import process_main

        conn = Connection(data)
        cwd, env, path = json.loads(conn.recv_bytes())
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        process_main(conn)
        exit_quietly()
    except BaseException:  # never return into the zygote's loop
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
