"""colbatch sets Polars' allocator to return freed pages at once, when it can and the user did not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def conf_after(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    proc = subprocess.run([sys.executable, "-c", code + "\nimport os; print(os.environ.get('_RJEM_MALLOC_CONF'))"],
                          capture_output=True, text=True, timeout=60,
                          env={**base, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_colbatch_before_polars_makes_polars_purge_freed_pages_at_once():
    conf = conf_after("import colbatch\nimport polars")
    # Polars appends what it finds to its own defaults; the last setting of a key wins in jemalloc.
    assert conf.endswith(",muzzy_decay_ms:0")


def test_a_users_allocator_setting_is_kept():
    assert conf_after("import colbatch\nimport polars", _RJEM_MALLOC_CONF="narenas:2").endswith(",narenas:2")


@pytest.mark.parametrize("code", ["import polars\nimport colbatch", "import polars"])
def test_polars_loaded_first_keeps_its_own_setting(code):
    assert "muzzy_decay_ms:0" not in conf_after(code)
