"""colbatch: columnar batch processing with Arrow batches, Polars steps, atomic sinks and full row accounting.

Example:
    >>> import colbatch as cb
    >>> report = cb.scan_csv("data/sample/events.csv").sink_parquet("out/events.parquet").run()
    >>> print(report)
"""

from colbatch.alerts import Progress, RunWarning
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
from colbatch.io import from_arrow, from_batches, scan_csv, scan_ipc, scan_ndjson, scan_parquet, scan_postgres
from colbatch.pipeline import Pipeline
from colbatch.query import Output, open_output
from colbatch.report import Report
from colbatch.tune import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ColbatchError", "ConfigError", "ErrorThresholdExceeded", "MissingDependencyError",
    "Output", "Pipeline", "Progress", "Report", "RunWarning", "SchemaError", "TuneResult", "SinkError", "SourceError", "UdfError",
    "from_arrow", "from_batches", "open_output", "scan_csv", "scan_ipc", "scan_ndjson", "scan_parquet",
    "scan_postgres", "tune",
]
