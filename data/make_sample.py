#!/usr/bin/env python3
"""Generate the deterministic sample inputs for colbatch under data/sample/.

Standalone: stdlib + numpy only.  Run from anywhere, e.g. from the repo root:

    python data/make_sample.py

Writes (next to this script):
    sample/events.csv        ~20k good rows + 25 deliberately bad lines
    sample/events.jsonl      5,000 valid objects + 10 malformed lines
    sample/events_2.csv.gz   5,000 rows, drifted schema (reordered, +channel, -text)

Every byte is a function of SEED, so re-running reproduces identical files
(gzip header mtime is pinned to 0 and the embedded filename is left empty).
After writing, the script re-reads the files and asserts that the good and bad
rows are exactly the ones intended; it exits non-zero if anything is off.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SEED = 20240301
HERE = Path(__file__).resolve().parent
OUT = HERE / "sample"

CSV_HEADER = ["id", "ts", "user_id", "type", "amount", "country", "text"]
CSV2_HEADER = ["user_id", "ts", "id", "amount", "type", "country", "channel"]
N_CSV = 20_000          # good data rows in events.csv (ids 1..20000)
N_JSONL = 5_000         # valid objects in events.jsonl (ids 20001..25000)
N_CSV2 = 5_000          # rows in events_2.csv.gz (ids 25001..30000)
BAD_ID_BASE = 90_000    # bad CSV rows carry ids 90001.. (where an id is present)
JSONL_BAD_ID_BASE = 99_000

TYPES = ["click", "view", "purchase", "signup", "logout"]
TYPE_P = [0.30, 0.50, 0.10, 0.05, 0.05]
COUNTRIES = ["US", "DE", "FR", "GB", "JP", "BR", "IN", "XX"]
COUNTRY_P = [0.30, 0.14, 0.12, 0.12, 0.10, 0.10, 0.09, 0.03]
CHANNELS = ["web", "ios", "android", "api"]
CHANNEL_P = [0.45, 0.25, 0.25, 0.05]
START = dt.datetime(2024, 3, 1, 0, 0, 0)

ADJ = ["quick", "blue", "new", "old", "big", "small", "red", "fast", "cheap",
       "premium", "free", "daily", "weekly", "late", "early", "smart", "basic"]
NOUN = ["offer", "banner", "cart", "item", "plan", "page", "promo", "deal",
        "order", "account", "video", "report", "coupon", "bundle", "ticket"]
VERB = ["opened", "viewed", "clicked", "saved", "shared", "bought", "closed",
        "liked", "skipped", "rated", "renewed", "cancelled"]
TAIL = ["today", "again", "on mobile", "after checkout", "from email", "twice",
        "via search", "at night", "on desktop", "by mistake"]
UNICODE_WORDS = ["café", "Müller", "naïve", "São Paulo", "東京", "Zürich", "crème brûlée"]

# Good rows (1-based good-row index) whose text contains an embedded newline.
MULTILINE_GOOD_ROWS = [100, 3000, 7777, 12000, 19999]

# Bad CSV rows: (insert after good row k, kind, variant).  Order = file order.
BAD_CSV_SPEC = [
    (2,     "ragged_short", 6),        # missing text column
    (250,   "bad_amount",   "12,5"),   # written quoted: "12,5"
    (777,   "bad_id",       "x10234"),
    (1200,  "ragged_long",  "comma"),  # unquoted comma in text -> 8 fields
    (1999,  "bad_amount",   "abc"),
    (2500,  "invalid_utf8", None),
    (3141,  "ragged_short", 3),        # truncated after user_id
    (4096,  "bad_amount",   "1e999x"),
    (5000,  "blank_line",   None),
    (5555,  "ragged_long",  9),        # two extra trailing fields
    (6400,  "bad_amount",   "12,5"),
    (7300,  "bad_id",       "1O234"),  # letter O, not zero
    (8000,  "ragged_short", 5),        # missing country,text
    (9001,  "bad_amount",   "abc"),
    (10000, "ragged_long",  10),       # three extra trailing fields
    (11111, "bad_amount",   "12,5"),
    (12345, "ragged_short", 1),        # only the id
    (13000, "bad_amount",   "1e999x"),
    (14142, "ragged_long",  "comma"),
    (15000, "bad_id",       "ID-77"),
    (16000, "bad_amount",   "abc"),
    (17171, "ragged_short", 6),
    (18000, "ragged_long",  9),
    (19000, "ragged_short", 4),        # missing amount,country,text
    (20000, "ragged_long",  8),        # last line of the file: one extra field
]

# JSONL: (1-based physical line, kind, variant) for the malformed lines, and
# good-object indices whose amount is a string.
BAD_JSONL_SPEC = [
    (3,    "truncated",        "mid_string"),
    (401,  "bare_string",      "plain"),
    (999,  "trailing_garbage", "word"),
    (1500, "truncated",        "no_close_brace"),
    (2222, "trailing_garbage", "extra_brace"),
    (2800, "bare_string",      "json_in_string"),
    (3333, "truncated",        "after_colon"),
    (4000, "trailing_garbage", "two_objects"),
    (4500, "truncated",        "mid_key"),
    (5010, "trailing_garbage", "trailing_comma"),  # last line
]
STRING_AMOUNT_GOOD_ROWS = {1234: "n/a", 2345: "n/a", 4321: "unknown"}  # 1-based good index


# --------------------------------------------------------------------------- helpers

def csv_field(s: str) -> str:
    """RFC-4180 minimal quoting."""
    if any(c in s for c in ',"\n\r'):
        return '"' + s.replace('"', '""') + '"'
    return s


def csv_line(fields) -> bytes:
    return (",".join(csv_field(f) for f in fields) + "\n").encode("utf-8")


def fmt_amount(x: float) -> str:
    s = f"{x:.2f}"
    return "0.00" if s == "-0.00" else s


class Gen:
    """All randomness flows through one numpy Generator in a fixed call order."""

    def __init__(self, seed: int, n: int, mean_gap_s: float):
        self.rng = np.random.default_rng(seed)
        gaps = self.rng.exponential(mean_gap_s, size=n).round().astype(np.int64)
        self.secs = np.cumsum(gaps)

    def ts(self, i: int) -> str:
        return (START + dt.timedelta(seconds=int(self.secs[i]))).strftime("%Y-%m-%dT%H:%M:%S")

    def user_id(self) -> int:
        return int(self.rng.integers(1, 2001))

    def type_(self) -> str:
        return str(self.rng.choice(TYPES, p=TYPE_P))

    def country(self) -> str:
        return str(self.rng.choice(COUNTRIES, p=COUNTRY_P))

    def amount(self) -> float:
        r = self.rng.random()
        if r < 0.02:                       # exactly zero
            return 0.0
        if r < 0.08:                       # refunds / negatives
            return -round(float(self.rng.uniform(0.01, 250.0)), 2)
        return max(0.01, round(float(self.rng.lognormal(3.0, 1.0)), 2))

    def text(self) -> str:
        rng = self.rng
        words = [str(rng.choice(ADJ)), str(rng.choice(NOUN)), str(rng.choice(VERB))]
        r = rng.random()
        if r < 0.08:                       # comma
            s = f"{words[0]} {words[1]}, {words[2]}"
        elif r < 0.11:                     # double quotes
            s = f'{words[2]} the "{words[0]}" {words[1]}'
        elif r < 0.13:                     # both
            s = f'{words[1]}, "{words[0]}" {words[2]}'
        elif r < 0.15:                     # valid non-ASCII UTF-8
            s = f"{words[0]} {rng.choice(UNICODE_WORDS)} {words[1]}"
        else:
            s = " ".join(words)
        return s + " " + str(rng.choice(TAIL))


# --------------------------------------------------------------------------- events.csv

def build_csv():
    g = Gen(SEED, N_CSV, 120.0)
    out = io.BytesIO()
    out.write(csv_line(CSV_HEADER))
    line = 2          # physical line number of the next record
    record = 2        # csv.reader record number of the next record (header = 1)
    manifest = []     # dicts describing every bad line
    multiline = []
    bad_by_after = {}
    for k, kind, var in BAD_CSV_SPEC:
        bad_by_after.setdefault(k, []).append((kind, var))
    bad_seq = 0

    def emit(b: bytes):
        nonlocal line, record
        start = line
        out.write(b)
        line += b.count(b"\n")
        record += 1
        return start

    for i in range(N_CSV):
        gi = i + 1
        uid, typ, amt, cty, txt = g.user_id(), g.type_(), g.amount(), g.country(), g.text()
        if gi in MULTILINE_GOOD_ROWS:
            txt = f"{txt}\nsecond line of note {gi}"
        row = [str(gi), g.ts(i), str(uid), typ, fmt_amount(amt), cty, txt]
        rec_no = record
        start = emit(csv_line(row))
        if "\n" in txt:
            multiline.append({"line": start, "end_line": line - 1, "record": rec_no, "id": gi})

        for kind, var in bad_by_after.get(gi, []):
            bad_seq += 1
            bid = BAD_ID_BASE + bad_seq
            f = [str(bid), g.ts(i), str(g.user_id()), g.type_(), fmt_amount(g.amount()),
                 g.country(), g.text()]
            note = ""
            if kind == "ragged_short":
                f = f[:var]
                note = f"{var} field{'s' if var > 1 else ''} instead of 7"
            elif kind == "ragged_long":
                if var == "comma":
                    f[6] = f[6].replace(",", "").replace('"', "")
                    raw = ",".join(f[:6]) + "," + f[6].replace(" ", ", ", 1) + "\n"
                    b = raw.encode("utf-8")
                    note = "8 fields: unquoted comma inside text"
                else:
                    f = f + ["extra%d" % j for j in range(var - 7)]
                    if var == 9:
                        f[7] = ""               # an empty extra field then a value
                    note = f"{var} fields instead of 7"
            elif kind == "bad_amount":
                f[4] = var
                note = f"amount {csv_field(var)} is not a number"
            elif kind == "bad_id":
                f[0] = var
                bid = None
                note = f"id {var!r} is not an integer"
            elif kind == "invalid_utf8":
                pass
            elif kind == "blank_line":
                bid = None
                note = "empty line"

            if kind == "blank_line":
                b = b"\n"
            elif kind == "invalid_utf8":
                # valid 7-field row whose text holds a lone Latin-1 byte (0xE9) and 0xFF
                f[6] = "caf\x00 menu"            # placeholder, replaced below
                b = csv_line(f).replace(b"caf\x00", b"caf\xe9 \xff")
                note = "text contains bytes 0xE9 0xFF (invalid UTF-8); otherwise a valid row"
            elif not (kind == "ragged_long" and var == "comma"):
                b = csv_line(f)
            rec_no = record
            start = emit(b)
            n_fields = 0 if kind == "blank_line" else None
            manifest.append({"line": start, "record": rec_no, "kind": kind, "id": bid,
                             "after_id": gi, "n_fields": n_fields, "note": note,
                             "raw": b})
    return out.getvalue(), manifest, multiline


# --------------------------------------------------------------------------- events.jsonl

def build_jsonl():
    g = Gen(SEED + 1, N_JSONL, 480.0)
    bad_lines = {ln: (kind, var) for ln, kind, var in BAD_JSONL_SPEC}
    lines = []
    manifest = []
    string_amount = []
    gi = 0
    bad_seq = 0
    total = N_JSONL + len(BAD_JSONL_SPEC)
    for ln in range(1, total + 1):
        if ln in bad_lines:
            kind, var = bad_lines[ln]
            bad_seq += 1
            i = max(gi - 1, 0)
            obj = {"id": JSONL_BAD_ID_BASE + bad_seq, "ts": g.ts(i), "user_id": g.user_id(),
                   "type": g.type_(), "amount": g.amount(), "country": g.country(),
                   "text": g.text()}
            full = json.dumps(obj, ensure_ascii=False)
            if kind == "truncated":
                if var == "mid_string":
                    s = full[: full.index('"ts": "') + 14]
                elif var == "no_close_brace":
                    s = full[:-1]
                elif var == "after_colon":
                    s = full[: full.index('"amount":') + 9]
                else:  # mid_key
                    s = full[: full.index('"country"') + 4]
            elif kind == "bare_string":
                s = json.dumps("orphan note without an object") if var == "plain" \
                    else json.dumps(full)
            else:  # trailing_garbage
                s = {"word": full + " garbage",
                     "extra_brace": full + "}",
                     "two_objects": full + ' {"id": 0}',
                     "trailing_comma": full + ","}[var]
            lines.append(s)
            manifest.append({"line": ln, "kind": kind, "variant": var, "raw": s})
            continue
        gi += 1
        i = gi - 1
        amt = g.amount()
        txt = g.text()
        if gi in (500, 4444):
            txt = f"{txt}\nsecond line"
        obj = {"id": N_CSV + gi, "ts": g.ts(i), "user_id": g.user_id(), "type": g.type_(),
               "amount": STRING_AMOUNT_GOOD_ROWS.get(gi, amt), "country": g.country(),
               "text": txt}
        if gi in STRING_AMOUNT_GOOD_ROWS:
            string_amount.append({"line": ln, "id": obj["id"], "amount": obj["amount"]})
        lines.append(json.dumps(obj, ensure_ascii=False))
    assert gi == N_JSONL
    data = ("\n".join(lines) + "\n").encode("utf-8")
    return data, manifest, string_amount


# --------------------------------------------------------------------------- events_2.csv.gz

def build_csv2():
    g = Gen(SEED + 2, N_CSV2, 480.0)
    out = io.BytesIO()
    out.write(csv_line(CSV2_HEADER))
    for i in range(N_CSV2):
        rec = {"id": str(N_CSV + N_JSONL + i + 1), "ts": g.ts(i), "user_id": str(g.user_id()),
               "type": g.type_(), "amount": fmt_amount(g.amount()), "country": g.country(),
               "channel": str(g.rng.choice(CHANNELS, p=CHANNEL_P))}
        out.write(csv_line([rec[c] for c in CSV2_HEADER]))
    raw = out.getvalue()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue(), raw


# --------------------------------------------------------------------------- verification

def classify_csv_record(fields):
    if fields == []:
        return "blank_line"
    if len(fields) < 7:
        return "ragged_short"
    if len(fields) > 7:
        return "ragged_long"
    if any("\udc80" <= c <= "\udcff" for f in fields for c in f):
        return "invalid_utf8"
    try:
        int(fields[0])
    except ValueError:
        return "bad_id"
    try:
        float(fields[4])
    except ValueError:
        return "bad_amount"
    return None


def verify(csv_bytes, csv_manifest, multiline, jsonl_bytes, jsonl_manifest, string_amount,
           csv2_gz, csv2_raw):
    # --- events.csv: every record classified, bad set == manifest
    text = csv_bytes.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = next(reader)
    assert header == CSV_HEADER, header
    prev_line = reader.line_num
    rec_no = 1
    found_bad, good = [], []
    for fields in reader:
        rec_no += 1
        start = prev_line + 1
        prev_line = reader.line_num
        kind = classify_csv_record(fields)
        if kind is None:
            good.append(fields)
        else:
            found_bad.append((start, rec_no, kind, len(fields)))
    expected = [(m["line"], m["record"], m["kind"]) for m in csv_manifest]
    assert [b[:3] for b in found_bad] == expected, (found_bad, expected)
    for m, b in zip(csv_manifest, found_bad):
        m["n_fields"] = b[3]
    # invalid UTF-8 appears on exactly the intended physical line
    bad_utf8_lines = []
    for n, raw_line in enumerate(csv_bytes.split(b"\n"), start=1):
        try:
            raw_line.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8_lines.append(n)
    assert bad_utf8_lines == [m["line"] for m in csv_manifest if m["kind"] == "invalid_utf8"]
    assert csv_bytes.count(b"\r") == 0 and csv_bytes.endswith(b"\n")
    # good rows: exactly ids 1..N in order, parse as the intended types
    assert len(good) == N_CSV
    assert [int(f[0]) for f in good] == list(range(1, N_CSV + 1))
    amts = np.array([float(f[4]) for f in good])
    for f in good:
        dt.datetime.strptime(f[1], "%Y-%m-%dT%H:%M:%S")
        int(f[2])
        assert f[3] in TYPES and f[5] in COUNTRIES
        assert f[4] == f"{float(f[4]):.2f}"
    ml = [f for f in good if "\n" in f[6]]
    assert [int(f[0]) for f in ml] == MULTILINE_GOOD_ROWS == [m["id"] for m in multiline]
    stats = {
        "amount<=0": float((amts <= 0).mean()),
        "XX": sum(f[5] == "XX" for f in good) / N_CSV,
        "text_with_comma": sum("," in f[6] for f in good),
        "text_with_quote": sum('"' in f[6] for f in good),
        "text_with_newline": len(ml),
    }

    # --- events.jsonl
    jl = jsonl_bytes.decode("utf-8").split("\n")
    assert jl[-1] == ""
    jl = jl[:-1]
    bad_j, good_j = [], []
    for n, s in enumerate(jl, start=1):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            bad_j.append(n)
            continue
        if not isinstance(obj, dict):
            bad_j.append(n)
            continue
        good_j.append((n, obj))
    assert bad_j == [m["line"] for m in jsonl_manifest], bad_j
    assert len(good_j) == N_JSONL
    assert [o["id"] for _, o in good_j] == list(range(N_CSV + 1, N_CSV + N_JSONL + 1))
    str_amt = [(n, o["id"], o["amount"]) for n, o in good_j if isinstance(o["amount"], str)]
    assert str_amt == [(s["line"], s["id"], s["amount"]) for s in string_amount]
    assert all(list(o) == CSV_HEADER for _, o in good_j)

    # --- events_2.csv.gz
    assert gzip.decompress(csv2_gz) == csv2_raw
    rows2 = list(csv.reader(io.StringIO(csv2_raw.decode("utf-8"), newline=""), strict=True))
    assert rows2[0] == CSV2_HEADER and len(rows2) == N_CSV2 + 1
    for r in rows2[1:]:
        assert len(r) == 7 and r[4] in TYPES and r[5] in COUNTRIES and r[6] in CHANNELS
        int(r[0]); int(r[2]); float(r[3])
    return stats


# --------------------------------------------------------------------------- README

def md_raw(b) -> str:
    if isinstance(b, bytes):
        b = b.rstrip(b"\n")
        try:
            t = b.decode("utf-8")
        except UnicodeDecodeError:
            t = repr(b)[2:-1]           # show invalid bytes as \xNN escapes
    else:
        t = b
    if len(t) > 70:
        t = t[:40] + " … " + t[-25:]
    return "`" + t + "`" if t else "(empty)"


def write_readme(sizes, csv_manifest, multiline, jsonl_manifest, string_amount, stats):
    L = []
    w = L.append
    w("# Sample data for colbatch")
    w("")
    w("Generated by `python data/make_sample.py` (run from the repo root; stdlib + numpy;")
    w(f"seed {SEED}). Output is byte-for-byte deterministic, and the script re-reads what it")
    w("wrote and fails unless the good/bad rows below are exactly as listed. This README is")
    w("written by the same script: edit the script, not this file.")
    w("")
    w("| file | bytes | contents |")
    w("| --- | ---: | --- |")
    w(f"| `sample/events.csv` | {sizes['events.csv']} | header + {N_CSV} good rows (ids 1..{N_CSV}, "
      f"in order) + {len(csv_manifest)} bad lines; {sizes['csv_lines']} physical lines, UTF-8, `\\n` endings |")
    w(f"| `sample/events.jsonl` | {sizes['events.jsonl']} | {N_JSONL} valid objects (ids "
      f"{N_CSV + 1}..{N_CSV + N_JSONL}) + {len(jsonl_manifest)} malformed lines = "
      f"{N_JSONL + len(jsonl_manifest)} lines |")
    w(f"| `sample/events_2.csv.gz` | {sizes['events_2.csv.gz']} | gzip, {N_CSV2} rows (ids "
      f"{N_CSV + N_JSONL + 1}..{N_CSV + N_JSONL + N_CSV2}), no bad rows, drifted schema |")
    w("")
    w("Columns of `events.csv` / `events.jsonl`: `" + ",".join(CSV_HEADER) + "`. `ts` is")
    w("`YYYY-MM-DDTHH:MM:SS` (no zone, March 2024); `type` in " + "/".join(TYPES) +
      "; `amount` has 2 decimals in CSV")
    w(f"(≤ 0 in {stats['amount<=0']:.1%} of good rows); `country` in " + ",".join(COUNTRIES) +
      f" (XX {stats['XX']:.1%}); `text` is a short")
    w(f"phrase: {stats['text_with_comma']} contain a comma, {stats['text_with_quote']} a double "
      "quote (RFC-4180 quoted), some valid non-ASCII UTF-8.")
    w("`events_2.csv.gz` columns: `" + ",".join(CSV2_HEADER) + "` (reordered, extra `channel` in "
      + "/".join(CHANNELS) + ", no `text`).")
    w("")
    w("## events.csv: deliberately bad lines")
    w("")
    w("`line` = physical line, 1-based, header = line 1. `record` = CSV record number as")
    w("Python's `csv.reader` counts them (header = 1; the blank line counts as an empty")
    w("record). They differ because these good rows hold a quoted embedded newline, each")
    w("spanning two lines: " + ", ".join(f"id {m['id']} (lines {m['line']}-{m['end_line']})"
                                          for m in multiline) + ".")
    w(f"Bad rows carry ids {BAD_ID_BASE + 1}..{BAD_ID_BASE + len(csv_manifest)} in the id column "
      "(except the bad-id rows and the blank line); `after id` is the good row just before.")
    w("")
    w("| line | record | kind | fields | after id | why | raw (shortened) |")
    w("| ---: | ---: | --- | ---: | ---: | --- | --- |")
    for m in csv_manifest:
        w(f"| {m['line']} | {m['record']} | {m['kind']} | {m['n_fields']} | {m['after_id']} | "
          f"{m['note'].replace('|', '/')} | {md_raw(m['raw'])} |")
    w("")
    counts = Counter(m["kind"] for m in csv_manifest)
    w("Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
      f" = {len(csv_manifest)} lines. `bad_amount` covers `\"12,5\"` (quoted, 7 fields), `abc`, "
      "`1e999x`.")
    w("")
    w("## events.jsonl: malformed lines and string amounts")
    w("")
    w("Line numbers are 1-based (no header). Good objects have keys in the CSV column order;")
    w("two contain an escaped `\\n` in `text`.")
    w("")
    w("| line | kind | raw (shortened) |")
    w("| ---: | --- | --- |")
    for m in jsonl_manifest:
        w(f"| {m['line']} | {m['kind']} ({m['variant']}) | {md_raw(m['raw'])} |")
    for sa in string_amount:
        w(f"| {sa['line']} | valid object, `amount` is the string `\"{sa['amount']}\"` "
          f"(id {sa['id']}) | |")
    w("")
    w("## Regenerate")
    w("")
    w("    python data/make_sample.py")
    w("")
    w("It rewrites `data/sample/*` and this README and prints a summary.")
    (HERE / "README.md").write_text("\n".join(L) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main

def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    csv_bytes, csv_manifest, multiline = build_csv()
    jsonl_bytes, jsonl_manifest, string_amount = build_jsonl()
    csv2_gz, csv2_raw = build_csv2()

    files = {"events.csv": csv_bytes, "events.jsonl": jsonl_bytes, "events_2.csv.gz": csv2_gz}
    for name, b in files.items():
        (OUT / name).write_bytes(b)
    # verify what is on disk, not what is in memory
    with gzip.open(OUT / "events_2.csv.gz", "rb") as fh:
        disk_csv2_raw = fh.read()
    assert disk_csv2_raw == csv2_raw
    stats = verify((OUT / "events.csv").read_bytes(), csv_manifest, multiline,
                   (OUT / "events.jsonl").read_bytes(), jsonl_manifest, string_amount,
                   (OUT / "events_2.csv.gz").read_bytes(), disk_csv2_raw)
    sizes = {k: len(v) for k, v in files.items()}
    sizes["csv_lines"] = csv_bytes.count(b"\n")
    write_readme(sizes, csv_manifest, multiline, jsonl_manifest, string_amount, stats)

    n_phys = csv_bytes.count(b"\n")
    print("events.csv")
    print(f"  bytes={len(csv_bytes)} physical_lines={n_phys} "
          f"good_rows={N_CSV} bad_lines={len(csv_manifest)}")
    print("  bad by kind: " + ", ".join(f"{k}={v}" for k, v in
                                        sorted(Counter(m['kind'] for m in csv_manifest).items())))
    print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in stats.items()))
    print("  multiline good rows (id@line-endline): " +
          ", ".join(f"{m['id']}@{m['line']}-{m['end_line']}" for m in multiline))
    print("  line  record kind          fields id     raw")
    for m in csv_manifest:
        raw = m["raw"].rstrip(b"\n")
        print(f"  {m['line']:5d} {m['record']:6d} {m['kind']:13s} {m['n_fields']:6d} "
              f"{str(m['id']):6s} {raw!r}"[:160])
    print("events.jsonl")
    print(f"  bytes={len(jsonl_bytes)} lines={N_JSONL + len(jsonl_manifest)} "
          f"valid_objects={N_JSONL} malformed={len(jsonl_manifest)} "
          f"string_amount={len(string_amount)}")
    print("  malformed by kind: " + ", ".join(
        f"{k}={v}" for k, v in sorted(Counter(m['kind'] for m in jsonl_manifest).items())))
    for m in jsonl_manifest:
        print(f"  {m['line']:5d} {m['kind']:16s} {m['raw'][:90]!r}")
    for s in string_amount:
        print(f"  {s['line']:5d} string_amount    id={s['id']} amount={s['amount']!r}")
    print("events_2.csv.gz")
    print(f"  bytes={len(csv2_gz)} uncompressed={len(csv2_raw)} rows={N_CSV2} "
          f"columns={','.join(CSV2_HEADER)}")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"data/ total bytes={total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
