"""Modules imported on first use, so `import colbatch` stays cheap for jobs that never touch them."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule(ModuleType):
    """Stands in for a module; the first attribute access imports it (`except lazy.Error` works too)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self.__dict__.get("_module")
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_module"] = module
        return getattr(module, attr)


# DuckDB costs ~45 ms to import; only aggregates, DuckDB sinks, hive partitions and queries need it.
duckdb = LazyModule("duckdb")
# Only process pools and Dask serialise functions.
cloudpickle = LazyModule("cloudpickle")
# pyarrow (~30 ms beyond NumPy): only Arrow input and output, Parquet/IPC sources, aggregates and
# UDF transport need it; a CSV → Parquet job never does (Polars writes Parquet itself).
pyarrow = LazyModule("pyarrow")
pyarrow_parquet = LazyModule("pyarrow.parquet")
pyarrow_ipc = LazyModule("pyarrow.ipc")
# NumPy (~45 ms): line numbers of rejects, UDF row positions, and byte counts of large text
# inputs; a small clean CSV job never needs it.
numpy = LazyModule("numpy")
