"""Input readers: URL lists (Parquet, CSV, TSV, JSONL, optionally gzipped) in LAION / CC3M / WIT shapes, and
local folders of images with optional sidecar .txt captions. Every extra input column is kept.

Each reader returns a pyarrow table with `key, url, alt_text, source, input_warning` first, then the input's
other columns. Rows that cannot become samples (no URL, unparseable JSON) are counted and described in an
`InputReport`, never silently dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from infra.settings import InputSpec
from infra.store import read_parquet_bytes
from tasks.urls import bytes_key, normalize_url, url_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Output columns an input column must not shadow; clashing input columns are renamed `input_<name>`.
RESERVED = {
    "key", "url", "alt_text", "source", "input_warning", "status", "error", "error_class", "width", "height",
    "original_width", "original_height", "sha256", "phash", "duplicate_of", "http_status", "bytes", "mime",
}
PRESETS: dict[str, tuple[list[str], list[str]]] = {
    # preset: (URL column candidates, caption column candidates; for WIT the first non-empty caption wins)
    "laion": (["URL", "url"], ["TEXT", "caption", "text"]),
    "cc3m": (["url"], ["caption"]),
    "wit": (["image_url"], ["caption_reference_description", "caption_alt_text_description",
                            "caption_attribution_description"]),
    "generic": (["url", "URL", "image_url", "img_url", "link"], ["caption", "TEXT", "text", "alt_text", "alt",
                                                                "title", "caption_reference_description"]),
}
MAX_REPORTED = 20
MAX_VALUE_LINES = 100  # a quoted CSV value over more lines than this is taken for a quote never closed


class InputError(ValueError):
    pass


@dataclass
class InputReport:
    path: str
    rows: int = 0
    rejected: int = 0
    examples: list[str] = field(default_factory=list)

    def reject(self, why: str) -> None:
        self.rejected += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(why)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    formats = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
               ".ndjson": "jsonl"}
    if ext not in formats:
        raise InputError(f"{path}: cannot tell the format from the name; set format (parquet/csv/tsv/jsonl/folder)")
    return formats[ext]


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError) as e:  # BadGzipFile, truncated stream
        raise InputError(f"{path}: not a readable gzip file: {e}") from None


def _looks_like_url(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def _quote_state(line: bytes, delimiter: bytes, inside: bool) -> tuple[bool, int]:
    """Whether `line` ends inside a quoted field, and where a field still open from the previous line closes
    (-1: not closed here). As Arrow reads CSV: a quote opens a field only at its start; `""` inside is a quote."""
    closed, i = -1, 0
    if not inside and line.startswith(b'"'):
        inside, i = True, 1
    while True:
        if inside:
            j = line.find(b'"', i)
            while j >= 0 and line[j + 1:j + 2] == b'"':
                j = line.find(b'"', j + 2)
            if j < 0:
                return True, closed
            closed = j if closed < 0 else closed
            inside, i = False, j + 1
        j = line.find(delimiter, i)
        if j < 0:
            return False, closed
        i = j + 1
        if line[i:i + 1] == b'"':
            inside, i = True, i + 1


def _looks_like_row(text: bytes, delimiter: bytes) -> bool:
    return any(_looks_like_url(cell.decode("utf-8", "replace")) for cell in text.split(delimiter))


def _drop_unclosed_quotes(data: bytes, delimiter: str, report: InputReport) -> bytes:
    """`data` with every line whose quote is never closed blanked (and reported). Arrow would read such a quote
    to the end of the file, or to the next stray quote, merging every row on the way into one value. A quote
    counts as unclosed when its value reaches the end of the file, a line that reads as a row of its own, or
    more than MAX_VALUE_LINES lines."""
    if b'"' not in data:
        return data
    lines, delim, dropped = data.split(b"\n"), delimiter.encode(), []
    i = 0
    while i < len(lines):
        if b'"' not in lines[i] or not _quote_state(lines[i], delim, False)[0]:
            i += 1
            continue
        why = "a quote opened here is never closed"
        for j in range(i + 1, min(len(lines), i + MAX_VALUE_LINES + 1)):
            inside, closed = _quote_state(lines[j], delim, True)
            if _looks_like_row(lines[j] if closed < 0 else lines[j][:closed], delim):
                why = f"a quote opened here runs into line {j + 1}, which reads as a row of its own"
                break
            if not inside:
                why = None
                break
        if why is None:
            i = j + 1  # one value over lines i..j
            continue
        report.reject(f"line {i + 1}: {why}; row skipped: {lines[i][:80].decode('utf-8', 'replace')!r}")
        dropped.append(i)
        i += 1
    for i in dropped:
        lines[i] = b""  # an empty line, which the CSV reader skips
    return b"\n".join(lines) if dropped else data


def _read_delimited(path: Path, delimiter: str, quoting: bool, report: InputReport) -> pa.Table:
    data = _open_bytes(path)
    if quoting:
        data = _drop_unclosed_quotes(data, delimiter, report)
    first_line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    header = not any(_looks_like_url(cell) for cell in first_line.split(delimiter))
    # Single-threaded: the Python row handler below must not be called from Arrow's thread pool.
    read = pacsv.ReadOptions(autogenerate_column_names=not header, block_size=1 << 24, use_threads=False)

    def bad_row(row) -> str:  # a row with the wrong number of fields is rejected and reported, not fatal
        where = f"line {row.number}" if row.number is not None else "a row"
        report.reject(f"{where}: {row.actual_columns} fields, expected {row.expected_columns}: {row.text[:80]!r}")
        return "skip"

    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                               newlines_in_values=quoting, invalid_row_handler=bad_row)
    convert = pacsv.ConvertOptions(check_utf8=False, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: cannot parse as {'CSV' if delimiter == ',' else 'TSV'}: {e}") from None
    if not header:
        # Headerless: CC3M is `caption<TAB>url`; in general name the URL-looking column `url`.
        names, url_idx = [], None
        for i, col in enumerate(table.columns):
            if url_idx is None and len(col) and _looks_like_url(col[0].as_py()):
                url_idx = i
        for i in range(table.num_columns):
            names.append("url" if i == url_idx else ("caption" if table.num_columns == 2 else f"col{i}"))
        table = table.rename_columns(names)
    return table


def _no_surrogates(value):
    """`value` with lone UTF-16 surrogates (from JSON escapes like \\ud800, not storable as UTF-8) replaced."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_surrogates(v) for v in value]
    return value


def _read_jsonl(path: Path, report: InputReport) -> tuple[pa.Table, dict[int, str]]:
    """The rows, and a warning per row index whose text had to be repaired."""
    rows, notes = [], {}
    for n, line in enumerate(_open_bytes(path).split(b"\n"), start=1):
        if not line.strip():
            continue
        note = None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "replace")
            note = f"line {n} was not valid UTF-8; undecodable bytes replaced"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            report.reject(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            report.reject(f"line {n}: a JSON {type(row).__name__}, not an object")
            continue
        if "\\u" in text and (fixed := _no_surrogates(row)) != row:
            row, note = fixed, f"line {n} had lone UTF-16 surrogate escapes; replaced"
        if note:
            notes[len(rows)] = note
        rows.append(row)
    if not rows:
        return pa.table({}), notes
    # Columns are the union of every row's keys (Table.from_pylist would take only the first row's).
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return pa.table({k: [r.get(k) for r in rows] for k in keys}), notes
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types across rows: keep the values, as JSON text.
        return pa.table({k: [None if r.get(k) is None else (r[k] if isinstance(r[k], str) else json.dumps(r[k]))
                             for r in rows] for k in keys}), notes


def _fix_utf8(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[bool]]:
    """Replace undecodable bytes in a string column read without UTF-8 checks; flag the rows that had them."""
    try:
        col.validate(full=True)
        return col, []
    except pa.ArrowInvalid:
        pass
    fixed, bad = [], []
    for value in col.cast(pa.binary()).to_pylist():
        if value is None:
            fixed.append(None)
            bad.append(False)
            continue
        try:
            fixed.append(value.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            fixed.append(value.decode("utf-8", "replace"))
            bad.append(True)
    return pa.chunked_array([pa.array(fixed, pa.string())]), bad


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _as_text(value: str | bytes, name: str) -> tuple[str, str | None]:
    if isinstance(value, str):
        return value, None
    try:
        return value.decode("utf-8"), None
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace"), f"column {name!r} was not valid UTF-8; undecodable bytes replaced"


def _text_values(col: pa.ChunkedArray, name: str, path: Path) -> tuple[list[str | None], dict[int, str]]:
    """A URL or caption column as text, and a note per row read with a repair (value kept) or not readable (value
    None): binary is decoded with replacement, a list of one text is that text. InputError for a type that is not
    text at all (a struct, a list of numbers)."""
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text_type(t.value_type)):
        values, notes = [], {}
        for row, value in enumerate(col.to_pylist()):
            if isinstance(value, list):
                if len(value) > 1:
                    notes[row] = f"column {name!r} holds a list of {len(value)} values, not one text"
                value = value[0] if len(value) == 1 else None
            if value is not None:
                value, note = _as_text(value, name)
                if note:
                    notes[row] = note
            values.append(value)
        return values, notes
    try:
        return col.cast(pa.string()).to_pylist(), {}
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise InputError(f"{path}: column {name!r} has type {t}, which cannot be read as text") from None


def _pick(names: list[str], candidates: list[str], explicit: str | None, what: str, path: Path) -> list[str]:
    if explicit:
        if explicit not in names:
            raise InputError(f"{path}: no {what} column {explicit!r}; columns are {names}")
        return [explicit]
    found = [c for c in candidates if c in names]
    if not found:
        lower = {n.lower(): n for n in names}
        found = [lower[c.lower()] for c in candidates if c.lower() in lower]
    if not found and what == "URL":
        raise InputError(f"{path}: no URL column among {names}; name it with --url-col")
    return found


HEADER_ROWS = 100  # JSONL rows whose keys stand for the file's columns in `check_inputs`


def _columns(path: Path, fmt: str) -> list[str] | None:
    """The input's column names from its first bytes only (Parquet: the schema); None for a CSV/TSV without a
    header, whose columns are named by their content."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if fmt == "parquet":
        try:
            schema = pq.read_schema(pa.BufferReader(_open_bytes(path)) if gzipped else path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file: {e}") from None
        return [n for n in schema.names if not n.startswith("__index_level_")]
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        try:
            lines = [f.readline(1 << 20) for _ in range(HEADER_ROWS if fmt == "jsonl" else 1)]
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable gzip file: {e}") from None
    if fmt == "jsonl":
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    delimiter = "\t" if fmt == "tsv" else ","
    first = lines[0].decode("utf-8", "replace").rstrip("\r\n")
    cells = next(csv.reader([first], delimiter=delimiter), []) if fmt == "csv" else first.split(delimiter)
    return None if any(_looks_like_url(c) for c in cells) else cells


def check_inputs(specs: list[InputSpec]) -> None:
    """What `read_url_list` would refuse, found in milliseconds before anything starts: a missing or unreadable
    input, an unknown format, a URL (or named caption) column that is not there. Reads only the header (Parquet:
    the schema; JSONL: the first rows)."""
    for spec in specs:
        path = Path(spec.path)
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        fmt = detect_format(path) if spec.format == "auto" else spec.format
        if (fmt == "folder") != path.is_dir():
            raise InputError(f"input {path} is {'a folder' if path.is_dir() else 'a file'}, but its format is {fmt}")
        if fmt == "folder":
            continue
        try:
            names = _columns(path, fmt)
        except OSError as e:
            raise InputError(f"input {path} cannot be read: {e.strerror or e}") from None
        if names is None:
            continue
        preset = spec.preset if spec.preset != "auto" else ("wit" if "image_url" in names else "generic")
        _pick(names, PRESETS[preset][0], spec.url_col, "URL", path)
        if spec.caption_col:
            _pick(names, [], spec.caption_col, "caption", path)


def read_url_list(spec: InputSpec) -> tuple[pa.Table, InputReport]:
    path = Path(spec.path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    if fmt == "folder":
        return read_folder(path)
    report = InputReport(str(path))
    notes: dict[int, str] = {}  # row index -> warning, from readers that repair rows themselves
    if fmt == "parquet":
        try:
            with open(path, "rb") as f:
                gzipped = f.read(2) == b"\x1f\x8b"  # `.parquet.gz` is accepted by detect_format
            table = read_parquet_bytes(_open_bytes(path)) if gzipped else pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file: {e}") from None
        # pandas writes its index as a column; it is not data.
        table = table.drop_columns([n for n in table.column_names if n.startswith("__index_level_")])
    elif fmt == "jsonl":
        table, notes = _read_jsonl(path, report)
    else:
        table = _read_delimited(path, "\t" if fmt == "tsv" else ",", quoting=fmt == "csv", report=report)
    names = table.column_names
    preset = spec.preset if spec.preset != "auto" else ("wit" if "image_url" in names else "generic")
    url_cols, caption_cols = PRESETS[preset]
    url_col = _pick(names, url_cols, spec.url_col, "URL", path)[0]
    caption_picks = _pick(names, caption_cols, spec.caption_col, "caption", path)
    caption_picks = caption_picks if preset == "wit" and not spec.caption_col else caption_picks[:1]

    warnings: list[str | None] = [None] * table.num_rows
    for row, note in notes.items():
        warnings[row] = note
    for i, name in enumerate(names):
        if pa.types.is_string(table.schema.field(name).type) or pa.types.is_large_string(table.schema.field(name).type):
            col, bad = _fix_utf8(table.column(name))
            if bad:
                table = table.set_column(i, name, col)
                for row, is_bad in enumerate(bad):
                    if is_bad:
                        warnings[row] = f"column {name!r} was not valid UTF-8; undecodable bytes replaced"

    captions: list[str | None] = [None] * table.num_rows
    for c in caption_picks:
        values, notes = _text_values(table.column(c), c, path)
        captions = [old if old else (v.strip() if isinstance(v, str) and v.strip() else None)
                    for old, v in zip(captions, values, strict=True)]
        for row, note in notes.items():
            warnings[row] = note
    urls, url_notes = _text_values(table.column(url_col), url_col, path)
    keep, keys, clean_urls = [], [], []
    for row, url in enumerate(urls):
        if url is None and row in url_notes:
            report.reject(f"row {row}: {url_notes[row]}")
            continue
        warnings[row] = url_notes.get(row, warnings[row])
        if not url or not url.strip():
            report.reject(f"row {row}: empty URL")
            continue
        keep.append(row)
        clean = url.strip()
        clean_urls.append(clean)
        keys.append(url_key(normalize_url(clean)))
    report.rows = len(keep)
    extras = table.drop_columns([url_col, *caption_picks]).take(pa.array(keep, pa.int64()))
    base = pa.table({
        "key": pa.array(keys, pa.string()),
        "url": pa.array(clean_urls, pa.string()),
        "alt_text": pa.array([captions[r] for r in keep], pa.string()),
        "source": pa.array(["url"] * len(keep), pa.string()),
        "input_warning": pa.array([warnings[r] for r in keep], pa.string()),
    })
    return _with_extras(base, extras), report


def _with_extras(base: pa.Table, extras: pa.Table) -> pa.Table:
    for name, col in zip(extras.column_names, extras.columns, strict=True):
        out_name = f"input_{name}" if name in RESERVED else name
        if pa.types.is_null(col.type):
            col = col.cast(pa.string())
        base = base.append_column(out_name, col)
    return base


def read_folder(root: Path) -> tuple[pa.Table, InputReport]:
    """Images under `root` (recursive); `<stem>.txt` beside an image is its caption. Keys hash the bytes."""
    report = InputReport(str(root))
    rows: dict[str, list] = {k: [] for k in ("key", "url", "alt_text", "source", "input_warning", "path")}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            key = bytes_key(file.read_bytes())
        except OSError as e:
            report.reject(f"{file}: unreadable ({e.strerror})")
            continue
        caption, warning = None, None
        sidecar = file.with_suffix(".txt")
        if sidecar.is_file():
            raw = sidecar.read_bytes()
            try:
                caption = raw.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                caption = raw.decode("utf-8", "replace").strip() or None
                warning = f"{sidecar.name} was not valid UTF-8; undecodable bytes replaced"
        for k, v in zip(rows, (key, file.resolve().as_uri(), caption, "file", warning,
                               str(file.relative_to(root))), strict=True):
            rows[k].append(v)
    report.rows = len(rows["key"])
    return pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()}), report


def read_inputs(specs: list[InputSpec]) -> tuple[pa.Table, list[InputReport]]:
    """All inputs as one table (columns unified; missing ones null)."""
    tables, reports = [], []
    for spec in specs:
        table, report = read_url_list(spec)
        tables.append(table)
        reports.append(report)
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({k: pa.array([], pa.string()) for k in ("key", "url", "alt_text", "source",
                                                                "input_warning")}), reports
    return pa.concat_tables(tables, promote_options="permissive"), reports


def first_occurrences(table: pa.Table) -> pa.Table:
    """Rows whose key (normalised URL) was not seen earlier in the table."""
    seen: set[str] = set()
    mask = []
    for key in table.column("key").to_pylist():
        mask.append(key not in seen)
        seen.add(key)
    return table.filter(pa.array(mask, pa.bool_()))


def drop_keys(table: pa.Table, keys: set[str]) -> pa.Table:
    if not keys:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("key"), pa.array(list(keys), pa.string()))))
