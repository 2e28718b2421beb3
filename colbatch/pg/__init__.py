"""PostgreSQL plumbing shared by the PostgreSQL sink and source: driver import, DSN masking, retries.

psycopg is an optional dependency (`pip install 'colbatch[postgres]'`); it is
imported lazily so the rest of colbatch works without it.
"""

from __future__ import annotations

import re
from typing import Any

from colbatch.errors import MissingDependencyError

INSTALL_HINT = "pip install 'colbatch[postgres]'"
# `user:password@` in a URL, and `password=...` in a key/value DSN.
_URL_PASSWORD = re.compile(r"(?P<head>://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<at>@)")
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&\s]*)", re.IGNORECASE)


def psycopg() -> Any:
    """The psycopg module, or MissingDependencyError with the install command."""
    try:
        import psycopg as module
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(f"PostgreSQL support needs psycopg 3; install it with `{INSTALL_HINT}`",
                                     package="psycopg") from exc
    return module


def mask_dsn(dsn: str) -> str:
    """`dsn` with any password replaced by `***`, for reports, errors and reprs."""
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['at']}", dsn)
    out = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", out)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}***", out)


def scrub(text: str, dsn: str) -> str:
    """Remove the password of `dsn` from any text (server or driver messages may echo it)."""
    text = mask_dsn(text)
    password = _password_of(dsn)
    return text.replace(password, "***") if password else text


def _password_of(dsn: str) -> str | None:
    try:
        from psycopg.conninfo import conninfo_to_dict

        value = conninfo_to_dict(dsn).get("password")
    except Exception:
        return None
    return str(value) if value else None


def connect(dsn: str, *, autocommit: bool = False) -> Any:
    """Open a connection; a failure raises the driver's error with the password scrubbed from its text."""
    pg = psycopg()
    try:
        return pg.connect(dsn, autocommit=autocommit, application_name="colbatch")
    except pg.Error as exc:
        raise type(exc)(scrub(str(exc), dsn)) from None
