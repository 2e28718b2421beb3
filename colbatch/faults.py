"""Fail points for the fault-injection tests: kill the process at a named instant.

`COLBATCH_FAULT="before-ledger:3"` makes the third arrival at the point
`before-ledger` kill the process with SIGKILL, as a crash or the OOM killer
would. Unset (always, outside the fault tests), `point()` is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("COLBATCH_FAULT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_COUNTS: dict[str, int] = {}


def point(name: str) -> None:
    """Die here with SIGKILL when the `COLBATCH_FAULT` setting names this point and arrival."""
    if not _SPEC or name != _NAME:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
