"""Python UDFs over whole batches (`Pipeline.map_batches`) on inline, threads, processes or Dask executors."""

from colbatch.udf.step import MapBatches, resolve_function

__all__ = ["MapBatches", "resolve_function"]
