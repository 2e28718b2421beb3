"""colbatch: columnar batch processing with Arrow batches, Polars steps, atomic sinks and full row accounting.

Example:
    >>> import colbatch as cb
    >>> report = cb.scan_csv("data/sample/events.csv").sink_parquet("out/events.parquet").run()
    >>> print(report)
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

# Polars' allocator (jemalloc) first marks freed pages reclaimable (MADV_FREE) and returns them
# only a second later; the kernel counts such pages in RSS until it needs them, so a long job's
# peak RSS kept rising with its length. Returning them at once keeps it flat at no measured cost.
# jemalloc reads this when Polars loads: it takes effect when colbatch is imported first (as by
# `python -m colbatch`), and a value the user set is kept. Workers inherit it.
POLARS_MALLOC_CONF = "muzzy_decay_ms:0"
if "polars" not in sys.modules:
    os.environ.setdefault("_RJEM_MALLOC_CONF", POLARS_MALLOC_CONF)

from colbatch.errors import (
    CheckpointError,
    ColbatchError,
    ConfigError,
    ErrorThresholdExceeded,
    MissingDependencyError,
    SchemaError,
    SinkError,
    SourceError,
    UdfError,
)

if TYPE_CHECKING:
    from colbatch.alerts import Progress, RunWarning
    from colbatch.io import from_arrow, from_batches, scan_csv, scan_ipc, scan_ndjson, scan_parquet, scan_postgres
    from colbatch.pipeline import Pipeline
    from colbatch.query import Output, open_output
    from colbatch.report import Report
    from colbatch.tuning import TuneResult, tune

# The public names, imported on first use: a UDF worker process imports `colbatch.udf.worker`, which
# imports this package first, and should not pay for the whole engine (~80 ms of CPU per worker).
_LAZY = {
    "Progress": "colbatch.alerts", "RunWarning": "colbatch.alerts",
    "from_arrow": "colbatch.io", "from_batches": "colbatch.io", "scan_csv": "colbatch.io", "scan_ipc": "colbatch.io",
    "scan_ndjson": "colbatch.io", "scan_parquet": "colbatch.io", "scan_postgres": "colbatch.io",
    "Pipeline": "colbatch.pipeline", "Output": "colbatch.query", "open_output": "colbatch.query",
    "Report": "colbatch.report", "TuneResult": "colbatch.tuning", "tune": "colbatch.tuning",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'colbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ColbatchError", "ConfigError", "ErrorThresholdExceeded", "MissingDependencyError",
    "Output", "Pipeline", "Progress", "Report", "RunWarning", "SchemaError", "TuneResult", "SinkError", "SourceError", "UdfError",
    "from_arrow", "from_batches", "open_output", "scan_csv", "scan_ipc", "scan_ndjson", "scan_parquet",
    "scan_postgres", "tune",
]
