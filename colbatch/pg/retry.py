"""Which PostgreSQL errors are transient (retry), which are about the data (isolate the rows), and backoff."""

from __future__ import annotations

import random
import re

# Connection exceptions (class 08), admin/crash shutdown, serialization failure and deadlock:
# the same statement can succeed on a fresh connection or a later attempt.
TRANSIENT_CLASSES = ("08",)
TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01", "53300"})
# Data exceptions (22) and integrity constraint violations (23): retrying cannot help; bisect to the bad rows.
DATA_CLASSES = ("22", "23")
# `COPY t, line 42, column x: ...` — in binary COPY the line is the 1-based row in the stream.
_COPY_LINE = re.compile(r"^COPY [^\n]*?, line (\d+)", re.MULTILINE)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error, if any."""
    return getattr(exc, "sqlstate", None)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying on a new connection: lost connection, shutdown, serialization, deadlock."""
    import psycopg

    state = sqlstate(exc)
    if state is None:
        # A lost connection surfaces as OperationalError/InterfaceError without a SQLSTATE.
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return state.startswith(TRANSIENT_CLASSES) or state in TRANSIENT_STATES


def is_data_error(exc: BaseException) -> bool:
    """True when the rows themselves are bad (type, value or constraint), so bisection can isolate them."""
    state = sqlstate(exc)
    return state is not None and state.startswith(DATA_CLASSES)


def copy_line(exc: BaseException) -> int | None:
    """The 1-based row of the COPY stream the server failed on, from the error's context, if it says."""
    diag = getattr(exc, "diag", None)
    context = getattr(diag, "context", None) if diag is not None else None
    m = _COPY_LINE.search(context or "")
    return int(m.group(1)) if m else None


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: about `base_s * 2**attempt`, scaled by 0.5–1.5, at most `cap_s`."""
    return min(cap_s, base_s * (2 ** attempt)) * (0.5 + random.random())
