"""Every notebook runs top to bottom on a real Jupyter kernel, and is committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NEEDS_PG = {"03-postgres.ipynb"}


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01-quickstart.ipynb", "02-tuning-and-bottlenecks.ipynb",
                                           "03-postgres.ipynb", "04-udfs-and-scale-out.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_real_kernel(path: Path, request, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no `python3` Jupyter kernel: pip install ipykernel (or run `python -m ipykernel install --user`)")
    if path.name in NEEDS_PG:
        request.getfixturevalue("pg_dsn")  # skips with the reason when no server answers (fails under COLBATCH_REQUIRE_PG=1)
    # The kernel imports this checkout of colbatch, runs from the repository root and writes only under out/.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no chart"


def test_progress_bar_is_on_by_default_in_a_notebook(tmp_path, monkeypatch):
    """A kernel's stderr is not a terminal, yet a run shows its progress bar there by default."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    src = tmp_path / "in.csv"
    src.write_text("a,b\n" + "".join(f"{i},x{i}\n" for i in range(1000)))
    code = (f"import colbatch as cb\nreport = cb.scan_csv({str(src)!r}).sink_parquet({str(tmp_path / 'o.parquet')!r}).run()\n"
            "print('rows', report.rows_written)")
    quiet = code.replace(".run()", ".run(progress=False)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code), nbformat.v4.new_code_cell(quiet)])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()

    def bars(cell) -> list:
        return [o for o in cell.outputs
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
                or (o.output_type == "stream" and o.name == "stderr" and "colbatch" in o.text)]

    assert any(o.output_type == "stream" and "rows 1000" in o.text for o in nb.cells[0].outputs)
    assert bars(nb.cells[0]), nb.cells[0].outputs
    assert not bars(nb.cells[1]), nb.cells[1].outputs


def test_no_progress_bar_off_a_terminal_outside_notebooks():
    from colbatch.runner import _progress, in_notebook

    assert not in_notebook()
    assert _progress(100, None) is None  # pytest captures stderr: not a terminal
