"""Input readers: LAION parquet, CSV, CC3M TSV, JSONL, gzip, WIT, explicit columns, hostile bytes, folders."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.settings import InputSpec
from tasks.inputs import (
    RESERVED,
    InputError,
    drop_keys,
    first_occurrences,
    read_folder,
    read_inputs,
    read_url_list,
)
from tasks.urls import bytes_key, normalize_url, url_key

LAION = Path(__file__).resolve().parents[2] / "shared" / "data" / "web" / "img2dataset_test_1000.parquet"
BASE_COLUMNS = ["key", "url", "alt_text", "source", "input_warning"]


def read(path: Path, **kw) -> tuple[pa.Table, object]:
    return read_url_list(InputSpec(path=str(path), **kw))


def expected_key(url: str) -> str:
    return url_key(normalize_url(url))


# --- LAION parquet (shared data, read in place) ---------------------------------------------------------------


def test_laion_parquet_default_mapping() -> None:
    raw = pq.read_table(LAION)
    table, report = read(LAION)
    assert table.num_rows == 1000
    assert report.rows == 1000 and report.rejected == 0
    assert table.column_names == BASE_COLUMNS  # URL/TEXT consumed, pandas index dropped
    assert "__index_level_0__" not in table.column_names
    urls = raw.column("URL").to_pylist()
    texts = raw.column("TEXT").to_pylist()
    assert table.column("url").to_pylist() == [u.strip() for u in urls]
    assert table.column("alt_text").to_pylist() == [t.strip() or None for t in texts]
    assert table.column("key").to_pylist() == [expected_key(u) for u in urls]
    assert set(table.column("source").to_pylist()) == {"url"}
    assert table.column("input_warning").null_count == 1000
    for field in table.schema:
        assert field.type == pa.string()
    # Keys are stable across reads, and with the explicit preset the result is the same.
    laion, _ = read(LAION, preset="laion")
    assert laion.equals(table)
    assert read(LAION)[0].column("key").equals(table.column("key"))


# --- CSV ----------------------------------------------------------------------------------------------------


def test_csv_with_header_keeps_typed_extras(tmp_path: Path) -> None:
    f = tmp_path / "pairs.csv"
    f.write_text(
        "url,caption,width_hint,score,nsfw_flag,tag\n"
        "http://a.com/1.jpg,A cat,640,0.5,true,x\n"
        'https://b.com/2.jpg,"A dog, ""running"" fast",320,,false,\n'
        '  http://c.com/3.jpg  ,"multi\nline caption",100,1.25,true,z\n',
        encoding="utf-8",
    )
    table, report = read(f)
    assert report.rows == 3 and report.rejected == 0
    assert table.column_names == [*BASE_COLUMNS, "width_hint", "score", "nsfw_flag", "tag"]
    assert table.column("url").to_pylist() == ["http://a.com/1.jpg", "https://b.com/2.jpg", "http://c.com/3.jpg"]
    assert table.column("alt_text").to_pylist() == ["A cat", 'A dog, "running" fast', "multi\nline caption"]
    assert table.schema.field("width_hint").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("nsfw_flag").type == pa.bool_()
    assert table.schema.field("tag").type == pa.string()
    assert table.column("width_hint").to_pylist() == [640, 320, 100]
    assert table.column("score").to_pylist() == [0.5, None, 1.25]
    assert table.column("nsfw_flag").to_pylist() == [True, False, True]
    assert table.column("tag").to_pylist() == ["x", "", "z"]
    assert table.column("key").to_pylist() == [expected_key(u) for u in table.column("url").to_pylist()]


def test_csv_headerless(tmp_path: Path) -> None:
    f = tmp_path / "pairs.csv"
    f.write_text("http://a.com/1.jpg,first\nhttp://a.com/2.jpg,second\n", encoding="utf-8")
    table, _ = read(f)
    assert table.column("url").to_pylist() == ["http://a.com/1.jpg", "http://a.com/2.jpg"]
    assert table.column("alt_text").to_pylist() == ["first", "second"]


def test_url_only_list_with_explicit_format(tmp_path: Path) -> None:
    f = tmp_path / "urls.txt"
    f.write_text("http://a.com/1.jpg\nhttp://a.com/2.jpg\n", encoding="utf-8")
    with pytest.raises(InputError, match="format"):
        read(f)
    table, report = read(f, format="csv")
    assert table.column("url").to_pylist() == ["http://a.com/1.jpg", "http://a.com/2.jpg"]
    assert table.column("alt_text").to_pylist() == [None, None]
    assert report.rows == 2


def test_csv_bom_header(tmp_path: Path) -> None:
    f = tmp_path / "excel.csv"
    f.write_bytes(b"\xef\xbb\xbfURL,TEXT\nhttp://a.com/1.jpg,hi\n")
    table, _ = read(f)
    assert table.column("url").to_pylist() == ["http://a.com/1.jpg"]
    assert table.column("alt_text").to_pylist() == ["hi"]


def test_csv_non_utf8_caption(tmp_path: Path) -> None:
    f = tmp_path / "latin1.csv"
    f.write_bytes(b"url,caption,note\n"
                  b"http://a.com/1.jpg,caf\xe9 au lait,ok\n"
                  b"http://a.com/2.jpg,plain,\xff\xfe\n"
                  b"http://a.com/3.jpg,fine \xc3\xa9,ok\n")
    table, report = read(f)
    assert report.rows == 3 and report.rejected == 0
    alt = table.column("alt_text").to_pylist()
    assert alt[0] == "caf\ufffd au lait"
    assert alt[1] == "plain"
    assert alt[2] == "fine é"
    warnings = table.column("input_warning").to_pylist()
    assert "caption" in warnings[0] and "UTF-8" in warnings[0]
    assert "note" in warnings[1]
    assert warnings[2] is None
    assert table.column("note").to_pylist() == ["ok", "\ufffd\ufffd", "ok"]
    table.validate(full=True)  # every string column is valid UTF-8 now


def test_empty_url_rows_rejected_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "pairs.csv"
    f.write_text("url,caption\nhttp://a.com/1.jpg,a\n,no url\n   ,blank url\nhttp://a.com/2.jpg,b\n",
                 encoding="utf-8")
    table, report = read(f)
    assert table.column("url").to_pylist() == ["http://a.com/1.jpg", "http://a.com/2.jpg"]
    assert report.rows == 2
    assert report.rejected == 2
    assert len(report.examples) == 2 and all("empty URL" in e for e in report.examples)

    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"url": ["http://a.com/1.jpg", None, ""], "caption": ["a", "b", "c"]}), p)
    table, report = read(p)
    assert table.num_rows == 1 and report.rows == 1 and report.rejected == 2


def test_empty_caption_is_null(tmp_path: Path) -> None:
    f = tmp_path / "pairs.csv"
    f.write_text("url,caption\nhttp://a.com/1.jpg,\nhttp://a.com/2.jpg,   \nhttp://a.com/3.jpg, x \n",
                 encoding="utf-8")
    table, _ = read(f)
    assert table.column("alt_text").to_pylist() == [None, None, "x"]


def test_malformed_csv_row_reported(tmp_path: Path) -> None:
    f = tmp_path / "pairs.csv"
    f.write_text("url,caption\nhttp://a.com/1.jpg,a\nhttp://a.com/2.jpg,b,extra field\nhttp://a.com/3.jpg,c\n",
                 encoding="utf-8")
    table, report = read(f)
    assert table.column("url").to_pylist() == ["http://a.com/1.jpg", "http://a.com/3.jpg"]
    assert report.rejected == 1
    assert "3 fields, expected 2" in report.examples[0]


# --- CC3M TSV -----------------------------------------------------------------------------------------------

CC3M_LINES = [
    ('a "quoted" word and an apostrophe\'s here', "http://cc.com/1.jpg"),
    ('"starts with a quote', "https://cc.com/2.jpg?w=500&h=300"),
    ("ends with a quote\"", "http://cc.com/3.jpg"),
    ("it's a dog's life , with a comma", "http://cc.com/4.jpg"),
    ("", "http://cc.com/5.jpg"),
]


def _cc3m_bytes() -> bytes:
    return "".join(f"{c}\t{u}\n" for c, u in CC3M_LINES).encode()


def test_cc3m_headerless_tsv(tmp_path: Path) -> None:
    f = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    f.write_bytes(_cc3m_bytes())
    table, report = read(f)
    assert report.rows == len(CC3M_LINES) and report.rejected == 0
    assert table.column_names == BASE_COLUMNS
    assert table.column("url").to_pylist() == [u for _, u in CC3M_LINES]
    assert table.column("alt_text").to_pylist() == [c or None for c, _ in CC3M_LINES]
    assert read(f, preset="cc3m")[0].equals(table)


def test_cc3m_tsv_with_a_broken_line(tmp_path: Path) -> None:
    f = tmp_path / "cc.tsv"
    f.write_bytes(_cc3m_bytes() + b"a caption\twith a tab\thttp://cc.com/6.jpg\nlast\thttp://cc.com/7.jpg\n")
    table, report = read(f)
    assert table.column("url").to_pylist() == [u for _, u in CC3M_LINES] + ["http://cc.com/7.jpg"]
    assert report.rejected == 1


def test_tsv_with_header(tmp_path: Path) -> None:
    f = tmp_path / "pairs.tsv"
    f.write_text('caption\turl\tlicense\nsaid "hi"\thttp://a.com/1.jpg\tcc-by\n', encoding="utf-8")
    table, _ = read(f)
    assert table.column("alt_text").to_pylist() == ['said "hi"']
    assert table.column("license").to_pylist() == ["cc-by"]


# --- JSONL --------------------------------------------------------------------------------------------------


def _jsonl_bytes() -> bytes:
    lines = [
        json.dumps({"url": "http://j.com/1.jpg", "caption": "one", "meta": {"w": 1}}),
        "{not json at all",
        json.dumps(["http://j.com/list.jpg", "a list"]),
        "",
        json.dumps({"url": "http://j.com/2.jpg", "caption": "two", "lang": "en"}),
        json.dumps({"url": "http://j.com/3.jpg", "caption": None, "meta": {"w": 3}}),
        '"just a string"',
    ]
    return ("\n".join(lines) + "\n").encode()


def test_jsonl_bad_lines_reported_others_kept(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_bytes(_jsonl_bytes())
    table, report = read(f)
    assert table.column("url").to_pylist() == ["http://j.com/1.jpg", "http://j.com/2.jpg", "http://j.com/3.jpg"]
    assert table.column("alt_text").to_pylist() == ["one", "two", None]
    assert report.rows == 3
    assert report.rejected == 3
    assert any(e.startswith("line 2:") and "not JSON" in e for e in report.examples)
    assert any(e.startswith("line 3:") and "list" in e for e in report.examples)
    assert any(e.startswith("line 7:") and "str" in e for e in report.examples)
    # Keys that appear only in later rows are kept too.
    assert table.column("lang").to_pylist() == [None, "en", None]
    assert table.column("meta").to_pylist() == [{"w": 1}, None, {"w": 3}]


def test_jsonl_mixed_types_kept_as_text(tmp_path: Path) -> None:
    f = tmp_path / "mixed.ndjson"
    f.write_text(json.dumps({"url": "http://j.com/1", "n": 1}) + "\n" + json.dumps({"url": "http://j.com/2", "n": "x"})
                 + "\n", encoding="utf-8")
    table, _ = read(f)
    assert table.column("n").to_pylist() == ["1", "x"]


def test_jsonl_invalid_utf8_and_surrogates(tmp_path: Path) -> None:
    f = tmp_path / "odd.jsonl"
    f.write_bytes(b'{"url": "http://j.com/caf\xe9.jpg", "caption": "ok"}\n'
                  b'{"url": "http://j.com/\\ud800.jpg", "caption": "lone \\udfff surrogates"}\n'
                  b'{"url": "http://j.com/\\ud83d\\ude00.jpg", "caption": "a pair is fine \\ud83d\\ude00"}\n')
    table, report = read(f)
    assert report.rows == 3 and report.rejected == 0
    assert table.column("url").to_pylist() == ["http://j.com/caf\ufffd.jpg", "http://j.com/\ufffd.jpg",
                                               "http://j.com/\U0001f600.jpg"]
    assert table.column("alt_text").to_pylist() == ["ok", "lone \ufffd surrogates", "a pair is fine \U0001f600"]
    warnings = table.column("input_warning").to_pylist()
    assert "line 1" in warnings[0] and "UTF-8" in warnings[0]
    assert "line 2" in warnings[1] and "surrogate" in warnings[1]
    assert warnings[2] is None
    assert len(set(table.column("key").to_pylist())) == 3
    table.validate(full=True)


# --- gzip ---------------------------------------------------------------------------------------------------


def test_gzipped_variants(tmp_path: Path) -> None:
    csv_text = b"url,caption\nhttp://g.com/1.jpg,one\nhttp://g.com/2.jpg,two\n"
    (tmp_path / "a.csv").write_bytes(csv_text)
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(csv_text))
    (tmp_path / "cc.tsv").write_bytes(_cc3m_bytes())
    (tmp_path / "cc.tsv.gz").write_bytes(gzip.compress(_cc3m_bytes()))
    (tmp_path / "j.jsonl").write_bytes(_jsonl_bytes())
    (tmp_path / "j.jsonl.GZ").write_bytes(gzip.compress(_jsonl_bytes()))
    sink = io.BytesIO()
    pq.write_table(pa.table({"URL": ["http://g.com/1.jpg"], "TEXT": ["one"]}), sink)
    (tmp_path / "p.parquet").write_bytes(sink.getvalue())
    (tmp_path / "p.parquet.gz").write_bytes(gzip.compress(sink.getvalue()))
    for plain in ["a.csv", "cc.tsv", "j.jsonl", "p.parquet"]:
        gz = next(tmp_path.glob(plain + ".*"))
        want, want_report = read(tmp_path / plain)
        got, got_report = read(gz)
        assert got.equals(want), gz
        assert (got_report.rows, got_report.rejected) == (want_report.rows, want_report.rejected)


def test_broken_gzip_is_input_error(tmp_path: Path) -> None:
    f = tmp_path / "a.csv.gz"
    f.write_bytes(gzip.compress(b"url,caption\n" + b"http://g.com/x.jpg,c\n" * 100)[:40])
    with pytest.raises(InputError, match=r"a\.csv\.gz"):
        read(f)


# --- WIT ----------------------------------------------------------------------------------------------------

WIT = {
    "language": ["en", "fr", "de", "en"],
    "page_url": ["https://en.wikipedia.org/wiki/A"] * 4,
    "image_url": ["https://upload.wikimedia.org/1.jpg", "https://upload.wikimedia.org/2.jpg",
                  "https://upload.wikimedia.org/3.jpg", "https://upload.wikimedia.org/4.jpg"],
    "caption_reference_description": ["ref one", "", None, ""],
    "caption_attribution_description": ["attr one", "attr two", "attr three", ""],
    "caption_alt_text_description": ["alt one", "alt two", "", ""],
}


def test_wit_parquet_caption_fallback(tmp_path: Path) -> None:
    f = tmp_path / "wit.parquet"
    pq.write_table(pa.table(WIT), f)
    table, _ = read(f)
    assert table.column("url").to_pylist() == WIT["image_url"]
    assert table.column("alt_text").to_pylist() == ["ref one", "alt two", "attr three", None]
    assert "language" in table.column_names and "page_url" in table.column_names
    assert read(f, preset="wit")[0].equals(table)


def test_wit_tsv(tmp_path: Path) -> None:
    f = tmp_path / "wit_v1.train.all-00000-of-00010.tsv.gz"
    cols = list(WIT)
    lines = ["\t".join(cols)]
    for i in range(4):
        lines.append("\t".join("" if WIT[c][i] is None else WIT[c][i] for c in cols))
    f.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    table, report = read(f)
    assert report.rows == 4
    assert table.column("alt_text").to_pylist() == ["ref one", "alt two", "attr three", None]
    assert table.column("language").to_pylist() == WIT["language"]


# --- explicit columns, clashes ------------------------------------------------------------------------------


def test_explicit_columns(tmp_path: Path) -> None:
    f = tmp_path / "odd.csv"
    f.write_text("id,link_to_image,desc,url\n1,http://e.com/1.jpg,first,http://decoy/1\n", encoding="utf-8")
    table, _ = read(f, url_col="link_to_image", caption_col="desc")
    assert table.column("url").to_pylist() == ["http://e.com/1.jpg"]
    assert table.column("alt_text").to_pylist() == ["first"]
    # The unused `url` column is an extra that clashes with an output name.
    assert table.column("input_url").to_pylist() == ["http://decoy/1"]
    assert table.column("id").to_pylist() == [1]


def test_explicit_missing_columns(tmp_path: Path) -> None:
    f = tmp_path / "odd.csv"
    f.write_text("id,link_to_image,desc\n1,http://e.com/1.jpg,first\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read(f, url_col="image")
    assert "'image'" in str(info.value) and "link_to_image" in str(info.value) and "desc" in str(info.value)
    with pytest.raises(InputError) as info:
        read(f, url_col="link_to_image", caption_col="caption")
    assert "'caption'" in str(info.value) and "link_to_image" in str(info.value)
    with pytest.raises(InputError, match="url-col"):
        read(f)  # nothing looks like a URL column


def test_case_insensitive_column_match(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("Image_URL,Caption\nhttp://e.com/1.jpg,x\n", encoding="utf-8")
    table, _ = read(f, preset="generic")
    assert table.column("url").to_pylist() == ["http://e.com/1.jpg"]
    assert table.column("alt_text").to_pylist() == ["x"]


def test_reserved_name_clash_renamed(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("url,caption,status,key,sha256,other\nhttp://e.com/1.jpg,x,ok,k1,abc,1\n", encoding="utf-8")
    table, _ = read(f)
    assert table.column_names == [*BASE_COLUMNS, "input_status", "input_key", "input_sha256", "other"]
    assert table.column("input_status").to_pylist() == ["ok"]
    assert table.column("key").to_pylist() == [expected_key("http://e.com/1.jpg")]
    assert {"status", "key", "sha256"} <= RESERVED


def test_null_typed_extra_column_becomes_string(tmp_path: Path) -> None:
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"url": ["http://e.com/1.jpg"], "empty": pa.nulls(1)}), f)
    table, _ = read(f)
    assert table.schema.field("empty").type == pa.string()


def test_missing_and_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read(tmp_path / "nope.csv")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="Parquet"):
        read(bad)


# --- keys, first occurrences, drop_keys, read_inputs --------------------------------------------------------


def test_keys_equal_for_equivalent_spellings(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("url,caption\n"
                 "http://example.com/a.jpg,first\n"
                 "HTTP://EXAMPLE.COM:80/a.jpg#frag,second\n"
                 "http://example.com/./x/../%61.jpg,third\n"
                 "http://example.com/b.jpg,other\n", encoding="utf-8")
    table, _ = read(f)
    keys = table.column("key").to_pylist()
    assert keys[0] == keys[1] == keys[2] != keys[3]
    # The original spelling is kept in `url`; only the key is normalised.
    assert table.column("url").to_pylist()[1] == "HTTP://EXAMPLE.COM:80/a.jpg#frag"
    first = first_occurrences(table)
    assert first.column("alt_text").to_pylist() == ["first", "other"]
    assert read(f)[0].column("key").to_pylist() == keys


def test_first_occurrences_and_drop_keys() -> None:
    table = pa.table({"key": ["a", "b", "a", "c", "b"], "n": [0, 1, 2, 3, 4]})
    assert first_occurrences(table).column("n").to_pylist() == [0, 1, 3]
    assert drop_keys(table, {"a"}).column("n").to_pylist() == [1, 3, 4]
    assert drop_keys(table, {"a", "b", "c"}).num_rows == 0
    assert drop_keys(table, set()).equals(table)
    assert drop_keys(table, {"zzz"}).equals(table)
    empty = table.slice(0, 0)
    assert first_occurrences(empty).num_rows == 0
    assert drop_keys(empty, {"a"}).num_rows == 0


def test_read_inputs_unifies_columns(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("url,caption,extra_a\nhttp://a.com/1,x,1\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"url": "http://b.com/1", "caption": "y", "extra_b": "z"}) + "\n",
                                      encoding="utf-8")
    table, reports = read_inputs([InputSpec(path=str(tmp_path / "a.csv")),
                                  InputSpec(path=str(tmp_path / "b.jsonl"))])
    assert [r.rows for r in reports] == [1, 1]
    assert table.column("url").to_pylist() == ["http://a.com/1", "http://b.com/1"]
    assert table.column("extra_a").to_pylist() == [1, None]
    assert table.column("extra_b").to_pylist() == [None, "z"]
    empty, _ = read_inputs([])
    assert empty.column_names == BASE_COLUMNS and empty.num_rows == 0


# --- folders ------------------------------------------------------------------------------------------------


def _png(color: tuple[int, int, int]) -> bytes:
    sink = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(sink, format="PNG")
    return sink.getvalue()


def test_folder_with_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_png((255, 0, 0)))
    (root / "a.txt").write_text("  a red square \n", encoding="utf-8")
    (root / "sub" / "b.JPG").write_bytes(_png((0, 255, 0)))
    (root / "sub" / "b.txt").write_bytes(b"gr\xfcn")  # latin-1, not UTF-8
    (root / "c.webp").write_bytes(_png((0, 0, 255)))  # no sidecar
    (root / "d.png").write_bytes(_png((255, 0, 0)))  # same bytes as a.png
    (root / "d.txt").write_text("", encoding="utf-8")  # empty caption
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    (root / "orphan.txt").write_text("no image here", encoding="utf-8")
    (root / "data.json").write_text("{}", encoding="utf-8")

    for table, report in [read_folder(root), read_url_list(InputSpec(path=str(root)))]:
        assert report.rows == 4 and report.rejected == 0
        assert table.column_names == [*BASE_COLUMNS, "path"]
        assert table.column("path").to_pylist() == ["a.png", "c.webp", "d.png", "sub/b.JPG"]
        assert table.column("alt_text").to_pylist() == ["a red square", None, None, "gr\ufffdn"]
        warnings = table.column("input_warning").to_pylist()
        assert warnings[:3] == [None, None, None]
        assert "b.txt" in warnings[3] and "UTF-8" in warnings[3]
        assert set(table.column("source").to_pylist()) == {"file"}
        assert table.column("url").to_pylist()[0] == (root / "a.png").resolve().as_uri()
        keys = table.column("key").to_pylist()
        assert keys[0] == bytes_key((root / "a.png").read_bytes())
        assert keys[0] == keys[2]  # identical bytes, identical key
        assert len(set(keys)) == 3
        assert first_occurrences(table).column("path").to_pylist() == ["a.png", "c.webp", "sub/b.JPG"]
    # Stable across reads.
    assert read_folder(root)[0].column("key").equals(read_folder(root)[0].column("key"))


def test_empty_folder(tmp_path: Path) -> None:
    table, report = read_folder(tmp_path)
    assert table.num_rows == 0 and report.rows == 0
    assert "key" in table.column_names
