"""Every example in README.md runs as written.

The README's fenced code blocks run in document order in one scratch directory
that holds a copy of `data/`, so relative paths such as `data/sample/events.csv`
and `out/...` resolve as they do from the repository root:

- ```python blocks run in one interpreter, sharing one `__main__` namespace
  (as if pasted one after another into a `python` session);
- ```bash / ```sh / ```console blocks run command by command in bash
  (`python` is this interpreter; `$ ` prompts are dropped), each must exit 0;
- ```toml blocks are job files: `<!-- file: NAME -->` on the line before the
  fence writes the block to NAME, for the commands that follow to use.

Markers (HTML comments on the lines right before a fence, invisible when rendered):

- `<!-- not-run: REASON -->` — the block is not run (a synopsis, an output
  listing, a fragment, or a remote cluster address); REASON must say why;
- `<!-- skip-commands: "PREFIX" "PREFIX" — REASON -->` — commands of a shell
  block starting with a PREFIX are not run (installs, the test suite itself);
- `<!-- needs: postgres -->` — the block needs the PostgreSQL test server;
  `$PG_DSN` points at it, with a private schema as the search path.

A block that is neither runnable nor marked fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*([\w-]+)\s*:?(.*?)-->\s*$")
MARKER_KINDS = {"not-run", "skip-commands", "file", "needs"}
DRIVER_TIMEOUT_S = 420


@dataclass
class Block:
    """One fenced code block of the README and the markers before it."""

    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'plain'}"

    def skip_prefixes(self) -> list[str]:
        return re.findall(r'"([^"]+)"', self.markers.get("skip-commands", ""))


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the markers on the lines before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence[:3]):
            j += 1
        markers: dict[str, str] = {}
        k = start - 1
        while k >= 0 and (mk := MARKER.match(lines[k])):
            markers[mk.group(1)] = mk.group(2).strip()
            k -= 1
        blocks.append(Block(start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", markers))
        i = j + 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, prompts, comments and blanks dropped."""
    commands, pending = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        commands.extend(part.strip() for part in line.split(" && ") if part.strip())
    return commands


def problems(block: Block) -> list[str]:
    """Why a block can be neither run nor skipped (an empty list when it is fine)."""
    unknown = [k for k in block.markers if k not in MARKER_KINDS]
    if unknown:
        return [f"unknown marker `{unknown[0]}`; valid: {', '.join(sorted(MARKER_KINDS))}"]
    if "not-run" in block.markers:
        reason = block.markers["not-run"]
        return [] if len(reason) >= 8 else ["a `not-run` marker must give its reason"]
    if block.lang in PYTHON_LANGS:
        return []
    if block.lang in SHELL_LANGS:
        prefixes = block.skip_prefixes()
        if "skip-commands" in block.markers and (not prefixes or "—" not in block.markers["skip-commands"]):
            return ['`skip-commands` takes quoted prefixes and a reason: "PREFIX" — REASON']
        runnable = [c for c in shell_commands(block.code) if not any(c.startswith(p) for p in prefixes)]
        bad = [c for c in runnable if not c.startswith("python ")]
        if bad:
            return [f"command `{bad[0]}` is not a `python ...` command; mark it with skip-commands or not-run"]
        return []
    if block.lang == "toml":
        return [] if block.markers.get("file") else ["a toml block needs `<!-- file: NAME -->` or `not-run`"]
    return [f"a ```{block.lang or ''} block is not runnable; give it `<!-- not-run: REASON -->`"]


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))


# -- the driver: runs every block in order in a scratch directory (a separate process) ---------


def drive(spec_path: str) -> None:
    """Run the blocks listed in the JSON spec; write one result per block to the spec's `results` path."""
    spec = json.loads(Path(spec_path).read_text())
    env = dict(os.environ)
    bindir = Path(spec["bindir"])
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    main_ns = sys.modules["__main__"].__dict__
    results = {}
    for b in spec["blocks"]:
        block = Block(**b)
        if "not-run" in block.markers:
            results[block.id] = {"status": "not-run"}
            continue
        if block.markers.get("needs") == "postgres" and not env.get("PG_DSN"):
            results[block.id] = {"status": "no-postgres"}
            continue
        try:
            if block.lang in PYTHON_LANGS:
                exec(compile(block.code, f"README.md:{block.line}", "exec"), main_ns)  # noqa: S102
                results[block.id] = {"status": "ok"}
            elif block.lang == "toml":
                Path(block.markers["file"]).write_text(block.code, encoding="utf-8")
                results[block.id] = {"status": "ok"}
            elif block.lang in SHELL_LANGS:
                ran = []
                for cmd in shell_commands(block.code):
                    if any(cmd.startswith(p) for p in block.skip_prefixes()):
                        continue
                    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                                          timeout=300)
                    ran.append(cmd)
                    if proc.returncode != 0:
                        raise RuntimeError(f"`{cmd}` exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                                           f"\nstderr:\n{proc.stderr[-3000:]}")
                results[block.id] = {"status": "ok", "commands": ran}
            else:
                results[block.id] = {"status": "failed", "error": "not runnable"}
        except BaseException:  # noqa: BLE001 - every failure is reported against its block
            results[block.id] = {"status": "failed", "error": traceback.format_exc()[-4000:]}
        Path(spec["results"]).write_text(json.dumps(results))
    Path(spec["results"]).write_text(json.dumps(results))


def _pg_dsn_if_available() -> str | None:
    from tests.pg import pg_dsn_value

    dsn = pg_dsn_value()
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception:  # no driver or no server: the PostgreSQL blocks skip
        return None
    return dsn


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    """Run all README blocks once, in order, in a scratch directory with a copy of data/."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "data", work / "data")
    bindir = work / ".bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH")] if p)
    env.pop("PG_DSN", None)
    dsn, schema = _pg_dsn_if_available(), f"cbreadme_{uuid.uuid4().hex[:10]}"
    if dsn is not None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        sep = "&" if "?" in dsn else "?"
        env["PG_DSN"] = f"{dsn}{sep}options=-csearch_path%3D{schema}"
    spec = {"blocks": [asdict(b) for b in BLOCKS], "bindir": str(bindir), "results": str(work / ".results.json")}
    (work / ".spec.json").write_text(json.dumps(spec))
    try:
        proc = subprocess.run([sys.executable, "-c", f"from tests.test_readme import drive; drive({str(work / '.spec.json')!r})"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    finally:
        if dsn is not None:
            import psycopg
            from psycopg import sql

            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    results_path = work / ".results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return {"results": results, "returncode": proc.returncode, "stderr": proc.stderr[-4000:],
            "stdout": proc.stdout[-20000:], "work": work}


def test_readme_has_examples():
    langs = {b.lang for b in BLOCKS if "not-run" not in b.markers}
    assert {"python", "bash", "toml"} <= langs, langs


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_readme_block_is_runnable_or_marked(block: Block):
    assert not problems(block), f"README.md line {block.line}: {problems(block)[0]}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if not problems(b) and "not-run" not in b.markers],
                         ids=lambda b: b.id)
def test_readme_example_runs(block: Block, readme_run: dict, request):
    result = readme_run["results"].get(block.id)
    if block.markers.get("needs") == "postgres":
        request.getfixturevalue("pg_dsn")  # skips (or fails under COLBATCH_REQUIRE_PG=1) without a server
    assert result is not None, (f"README.md line {block.line} did not run (driver exit "
                                f"{readme_run['returncode']}):\n{readme_run['stderr']}")
    assert result["status"] == "ok", f"README.md line {block.line} ({block.lang}) failed:\n{result.get('error')}"


def test_readme_examples_wrote_their_outputs(readme_run: dict):
    """The examples really ran: the demo and the job file left committed outputs behind."""
    work = readme_run["work"]
    assert (work / "out/demo/events.parquet").is_file()
    assert (work / "out/demo/events.parquet.manifest.json").is_file()
    assert not list(work.rglob("*.colbatch-tmp"))


def test_parser_sees_markers_and_commands():
    text = textwrap.dedent("""\
        <!-- not-run: an output listing -->
        ```
        x
        ```
        <!-- skip-commands: "pip install" — changes the environment -->
        ```bash
        pip install -e . && python -m colbatch demo   # demo
        $ python -m colbatch query \\
            "SELECT 1"
        ```
        ```toml
        a = 1
        ```
        """)
    plain, shell, toml = parse_blocks(text)
    assert plain.markers == {"not-run": "an output listing"} and not problems(plain)
    assert shell.skip_prefixes() == ["pip install"] and not problems(shell)
    assert shell_commands(shell.code) == ["pip install -e .", "python -m colbatch demo   # demo",
                                          'python -m colbatch query "SELECT 1"']
    assert problems(toml) == ["a toml block needs `<!-- file: NAME -->` or `not-run`"]
    assert problems(parse_blocks("```bash\nrm -rf out\n```\n")[0])
    assert problems(parse_blocks("```text\nout\n```\n")[0])
