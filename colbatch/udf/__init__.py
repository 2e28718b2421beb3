"""Python UDFs over whole batches (`Pipeline.map_batches`) on inline, threads, processes or Dask executors.

The exports load on first use: a worker process imports only `colbatch.udf.worker`.
"""

from typing import Any

__all__ = ["MapBatches", "resolve_function"]


class StageStopped(Exception):
    """The run was stopped by another stage while a UDF stage waited."""


def resolve_executor(executor: Any, workers: int) -> Any:
    """A step's executor with `"auto"` resolved: processes with several workers, inline with one."""
    if executor == "auto":
        return "processes" if workers > 1 else "inline"
    return executor


def __getattr__(name: str) -> Any:
    if name in __all__:
        from colbatch.udf import step

        return getattr(step, name)
    raise AttributeError(f"module 'colbatch.udf' has no attribute {name!r}")
