"""Moving batches between processes as Arrow IPC: reusable shared-memory segments and plain IPC bytes.

The driver owns every segment (it creates and unlinks them), so a worker that
is killed can never leak one. A worker attaches to a segment by name, reads
its input zero-copy and writes its output into a second segment; both are
reused batch after batch and only replaced when a batch outgrows them.
"""

from __future__ import annotations

from multiprocessing import resource_tracker, shared_memory

import polars as pl

from colbatch.lazy import pyarrow as pa

# Segments are sized in powers of two from here, so a stream of similar batches settles on
# one allocation per worker instead of resizing for every slightly larger batch.
MIN_SEGMENT_BYTES = 1 << 20


def segment_size(nbytes: int) -> int:
    """The capacity to allocate for a payload of `nbytes`: the next power of two, at least 1 MiB."""
    size = MIN_SEGMENT_BYTES
    while size < nbytes:
        size <<= 1
    return size


def to_arrow(df: pl.DataFrame) -> pa.Table:
    """The frame as Arrow for IPC, in Polars' own layout when that is not larger.

    Polars keeps strings as Arrow `string_view`, which crosses IPC without a copy;
    the default `large_string` export copies every string (about 80% of the
    transport time of a string-heavy batch). But the views of a slice can point
    into buffers far larger than the slice, which IPC would write whole: then
    the compact, copying export is the smaller one. Several chunks are written
    as they are, no rechunk copy.
    """
    table = df.to_arrow(compat_level=pl.CompatLevel.newest())
    if table.get_total_buffer_size() > 2 * df.estimated_size() + MIN_SEGMENT_BYTES:
        return df.to_arrow()
    return table


_table = to_arrow


def ipc_size(table: pa.Table) -> int:
    """Bytes the Arrow IPC stream of `table` takes, computed without writing it."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.size()


def write_ipc(table: pa.Table, buf: memoryview) -> int:
    """Write `table` as an Arrow IPC stream into `buf`; returns the bytes written."""
    sink = pa.FixedSizeBufferWriter(pa.py_buffer(buf))
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.tell()


def read_ipc(buf: memoryview | bytes, nbytes: int, *, copy: bool) -> pl.DataFrame:
    """Read an Arrow IPC stream of `nbytes` from `buf` as a DataFrame.

    With `copy=False` the frame points into `buf` (valid only while the segment
    is not reused); with `copy=True` the bytes are copied first, once.
    """
    view = buf[:nbytes]
    data = pa.py_buffer(bytes(view)) if copy else pa.py_buffer(view)
    table = pa.ipc.open_stream(data).read_all()
    return pl.from_arrow(table)  # type: ignore[return-value]


def to_ipc_bytes(df: pl.DataFrame) -> bytes:
    """A DataFrame as Arrow IPC stream bytes (for executors that take pickled arguments)."""
    table = _table(df)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc_bytes(data: bytes) -> pl.DataFrame:
    """The inverse of `to_ipc_bytes`."""
    return pl.from_arrow(pa.ipc.open_stream(pa.py_buffer(data)).read_all())  # type: ignore[return-value]


class Segment:
    """A driver-owned shared-memory segment that a worker writes or reads by name."""

    def __init__(self, nbytes: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=segment_size(nbytes))
        self.name = self.shm.name
        self.capacity = self.shm.size

    def read(self, nbytes: int) -> pl.DataFrame:
        """Read (copying) the IPC stream a worker wrote here."""
        return read_ipc(self.shm.buf, nbytes, copy=True)

    def release(self) -> None:
        """Close and unlink; safe to call twice."""
        try:
            self.shm.close()
            self.shm.unlink()
        except (FileNotFoundError, BufferError):
            pass


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach to a driver-owned segment without registering it with this process's resource tracker.

    Python 3.11 registers attached segments as if this process owned them and
    unlinks (and warns about) them when it exits; the driver owns them instead.
    """
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register
