"""The run report: accounting, timings, memory, outputs and the bottleneck verdict."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from colbatch.charts import report_charts
from colbatch.metrics import StageMetrics


@dataclass
class Report:
    """What a run did; returned by `Pipeline.run()` and written by `--report`.

    Example:
        >>> report = cb.scan_csv("data/sample/events.csv").sink_parquet("out.parquet").run()
        >>> report.rows_written, report.rows_rejected
    """

    status: str = "running"
    error: str | None = None
    error_type: str | None = None
    source: str = ""
    sink: str = ""
    rows_read: int = 0
    rows_written: int = 0
    rows_filtered: int = 0
    rows_rejected: int = 0
    # Source records whose output an earlier, interrupted run committed (skipped by resume).
    rows_resumed: int = 0
    # Source records the interrupted run had sent its sink but not committed, which this run read again
    # (measured by the file and DuckDB sinks; at most one commit unit).
    rows_redone: int = 0
    # True when the output already held this job's complete result, so nothing ran.
    skipped: bool = False
    # Transient failures that were retried (each is also logged).
    retries: int = 0
    # Rows consumed by an aggregate stage; when set they, not the (result) rows written, balance the totals.
    rows_aggregated: int | None = None
    rejects_by_stage: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    peak_rss_bytes: int = 0
    stages: list[StageMetrics] = field(default_factory=list)
    bottleneck: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    rejects_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    batch_rows: int = 0
    batches: int = 0
    # (seconds since start, rows per batch) each time the batch size changed; the first entry is the start size.
    batch_sizes: list[tuple[float, int]] = field(default_factory=list)
    # Samples over time: CPU of this process and its children, queue depths, rows written, stage busy seconds.
    timeline: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # Garbage-collector pauses during the run.
    gc: dict[str, Any] = field(default_factory=dict)
    memory_samples: list[tuple[float, int]] = field(default_factory=list, repr=False)
    rejects: pl.DataFrame | None = field(default=None, repr=False)

    @property
    def succeeded(self) -> bool:
        """True when the run finished and committed its outputs."""
        return self.status == "succeeded"

    def accounting_ok(self) -> bool:
        """Every stage balances and the totals agree with the stages."""
        delivered = self.rows_written if self.rows_aggregated is None else self.rows_aggregated
        created = sum(s.rows_created for s in self.stages)
        return all(s.balanced() for s in self.stages) and self.rows_read + created == (
            delivered + self.rows_filtered + self.rows_rejected
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the keys of DESIGN.md's report contract)."""
        return {
            "status": self.status,
            "error": self.error,
            "error_type": self.error_type,
            "source": self.source,
            "sink": self.sink,
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "rows_filtered": self.rows_filtered,
            "rows_rejected": self.rows_rejected,
            "rows_resumed": self.rows_resumed,
            "rows_redone": self.rows_redone,
            "skipped": self.skipped,
            "retries": self.retries,
            "rows_aggregated": self.rows_aggregated,
            "rejects_by_stage": dict(self.rejects_by_stage),
            "elapsed_s": round(self.elapsed_s, 4),
            "peak_rss_bytes": self.peak_rss_bytes,
            "batch_rows": self.batch_rows,
            "batches": self.batches,
            "batch_sizes": [list(b) for b in self.batch_sizes],
            "stages": [s.to_dict() for s in self.stages],
            "bottleneck": self.bottleneck,
            "outputs": list(self.outputs),
            "rejects_path": self.rejects_path,
            "warnings": list(self.warnings),
            "memory_samples": [list(s) for s in self.memory_samples],
            "timeline": list(self.timeline),
            "gc": dict(self.gc),
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)

    def summary(self) -> str:
        """A readable multi-line text summary."""
        rate = self.rows_read / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"colbatch run {self.status} in {self.elapsed_s:.2f}s ({rate:,.0f} rows/s, peak RSS {self.peak_rss_bytes / 2**20:,.0f} MiB)",
            f"  source : {self.source}",
            f"  sink   : {self.sink}",
            f"  rows   : {self.rows_read:,} read = {self.rows_written:,} written + {self.rows_filtered:,} filtered"
            f" + {self.rows_rejected:,} rejected",
        ]
        if self.rows_aggregated is not None:
            lines[-1] = (f"  rows   : {self.rows_read:,} read = {self.rows_aggregated:,} aggregated + "
                         f"{self.rows_filtered:,} filtered + {self.rows_rejected:,} rejected; "
                         f"{self.rows_written:,} result rows written")
        if self.rejects_by_stage:
            by = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejects_by_stage.items()))
            where = f" → {self.rejects_path}" if self.rejects_path else " (kept in report.rejects)"
            lines.append(f"  rejects: {by}{where}")
        if self.batch_sizes:
            sizes = " → ".join(f"{rows:,}" for _, rows in self.batch_sizes[:8])
            more = f" (+{len(self.batch_sizes) - 8} changes)" if len(self.batch_sizes) > 8 else ""
            lines.append(f"  batches: {self.batches:,} of {sizes}{more} rows")
        lines.append("  stages :")
        for s in self.stages:
            lines.append(
                f"    {s.name:<28} in {s.rows_in:>12,}  out {s.rows_out:>12,}  filtered {s.rows_filtered:>9,}"
                f"  rejected {s.rows_rejected:>7,}  busy {s.busy_s:7.2f}s  wait {s.wait_s:6.2f}s  blocked {s.blocked_s:6.2f}s"
            )
        if self.bottleneck:
            lines.append(f"  bottleneck: {self.bottleneck.get('verdict', '')}")
            if self.bottleneck.get("explanation"):
                lines.append(f"  why       : {self.bottleneck['explanation']}")
            if self.bottleneck.get("recommendation"):
                lines.append(f"  advice    : {self.bottleneck['recommendation']}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        for out in self.outputs[:10]:
            lines.append(f"  output : {out}")
        if len(self.outputs) > 10:
            lines.append(f"  output : ... {len(self.outputs) - 10} more files")
        if self.error:
            lines.append(f"  error  : {self.error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        esc = html.escape
        color = "#2e7d32" if self.succeeded else "#c62828"
        rows = "".join(
            f"<tr><td>{esc(s.name)}</td><td>{s.rows_in:,}</td><td>{s.rows_out:,}</td><td>{s.rows_filtered:,}</td>"
            f"<td>{s.rows_rejected:,}</td><td>{s.busy_s:.2f}</td><td>{s.wait_s:.2f}</td><td>{s.blocked_s:.2f}</td></tr>"
            for s in self.stages
        )
        warn = "".join(f"<li>{esc(w)}</li>" for w in self.warnings)
        err = f"<p style='color:{color}'><b>error:</b> {esc(self.error)}</p>" if self.error else ""
        return (
            f"<div><p><b style='color:{color}'>{esc(self.status)}</b> in {self.elapsed_s:.2f}s — "
            f"{self.rows_read:,} read, {self.rows_written:,} written, {self.rows_filtered:,} filtered, "
            f"{self.rows_rejected:,} rejected; peak RSS {self.peak_rss_bytes / 2**20:,.0f} MiB</p>{err}"
            f"<table><tr><th>stage</th><th>in</th><th>out</th><th>filtered</th><th>rejected</th>"
            f"<th>busy s</th><th>wait s</th><th>blocked s</th></tr>{rows}</table>"
            f"<p><b>bottleneck:</b> {esc(str(self.bottleneck.get('verdict', '')))}"
            + "".join(f"<br><i>{label}:</i> {esc(str(self.bottleneck[key]))}" for key, label in
                      (("explanation", "why"), ("recommendation", "advice")) if self.bottleneck.get(key))
            + "</p>"
            + report_charts(self.timeline, self.memory_samples, self.bottleneck.get("busy_share", {}))
            + (f"<ul>{warn}</ul>" if warn else "") + "</div>"
        )


    def save_html(self, path: str | os.PathLike) -> None:
        """Write the report as a standalone HTML page (summary, bottleneck, charts; no scripts)."""
        page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>colbatch report</title></head>"
                f"<body style='font-family:sans-serif'>{self._repr_html_()}</body></html>")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)


def bottleneck(stages: list[StageMetrics], elapsed_s: float, *, source: str, sink: str) -> dict[str, Any]:
    """Which stage bounds the run, from stage times alone (see `colbatch.diagnose.diagnose` for the full verdict)."""
    from colbatch.diagnose import diagnose

    return diagnose(stages, elapsed_s, source=source, sink=sink)
