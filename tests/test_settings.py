"""Settings from the environment, and the dataset spec: defaults, errors that name the field, YAML loading,
and the ingest config hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import (
    DEFAULT_STORE,
    DatasetSpec,
    DownloadConfig,
    ImageConfig,
    IngestConfig,
    InputSpec,
    Settings,
    SpecError,
    build_spec,
    load_spec,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in [v for v in os.environ if v.startswith("CAPFACTORY_")]:
        monkeypatch.delenv(var)


# --- defaults -----------------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    spec = build_spec({"name": "demo"})
    assert spec.name == "demo"
    assert spec.inputs == []
    assert spec.store is None
    assert spec.ingest == IngestConfig()
    assert spec.ingest.images.image_size == 256
    assert spec.ingest.images.resize_mode == "keep_ratio"
    assert spec.ingest.download.allow_cidrs == ()
    assert spec.ingest.download.respect_robots_txt
    assert "capfactory/" in spec.ingest.download.user_agent
    assert len(spec.ingest.config_hash()) == 16


def test_full_spec_valid() -> None:
    spec = build_spec({
        "name": "laion-mini_v1.2",
        "store": "s3://bucket/prefix",
        "inputs": [{"path": "a.parquet", "preset": "laion"},
                   {"path": "b.tsv", "format": "tsv", "url_col": "u", "caption_col": "c"}],
        "ingest": {"shard_size": 10, "phash_threshold": 0,
                   "images": {"image_size": 512, "resize_mode": "center_crop", "encode_format": "webp"},
                   "download": {"allow_cidrs": ["127.0.0.0/8", "::1/128", "10.0.0.1"], "concurrency": 8}},
    })
    assert spec.inputs[1] == InputSpec(path="b.tsv", format="tsv", url_col="u", caption_col="c")
    assert spec.ingest.images.encode_format == "webp"
    assert spec.ingest.download.allow_cidrs == ("127.0.0.0/8", "::1/128", "10.0.0.1")


def test_spec_is_frozen() -> None:
    spec = build_spec({"name": "demo"})
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]


# --- errors name the field ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "extra"),
    [
        ({"name": "d", "ingest": {"images": {"image_size": -5}}}, "ingest.images.image_size", "-5"),
        ({"name": "d", "ingest": {"images": {"image_size": "big"}}}, "ingest.images.image_size", "big"),
        ({"name": "d", "ingest": {"images": {"resize_mode": "stretch"}}}, "ingest.images.resize_mode", "stretch"),
        ({"name": "d", "ingest": {"images": {"encode_quality": 0}}}, "ingest.images.encode_quality", None),
        ({"name": "d", "ingest": {"download": {"allow_cidrs": ["10.0.0.0/33"]}}}, "ingest.download.allow_cidrs",
         "10.0.0.0/33"),
        ({"name": "d", "ingest": {"download": {"allow_cidrs": ["localhost"]}}}, "ingest.download.allow_cidrs",
         "not a CIDR"),
        ({"name": "d", "ingest": {"shard_sise": 10}}, "ingest.shard_sise", "Extra inputs are not permitted"),
        ({"name": "d", "ingest": {"images": {"imagesize": 10}}}, "ingest.images.imagesize", "not permitted"),
        ({"name": "d", "typo": 1}, "typo", "not permitted"),
        ({"name": "bad name!"}, "name", "letters, digits"),
        ({"name": ""}, "name", None),
        ({"name": "-leading-dash"}, "name", None),
        ({"name": "x" * 129}, "name", None),
        ({}, "name", "Field required"),
        ({"name": "d", "inputs": [{"path": "a.csv", "format": "xls"}]}, "inputs.0.format", "xls"),
        ({"name": "d", "inputs": [{"path": "a.csv", "preset": "coco"}]}, "inputs.0.preset", "coco"),
        ({"name": "d", "inputs": [{"format": "csv"}]}, "inputs.0.path", "Field required"),
        ({"name": "d", "ingest": {"phash_threshold": 17}}, "ingest.phash_threshold", None),
        ({"name": "d", "ingest": {"download": {"user_agent_token": "a b"}}}, "ingest.download.user_agent_token",
         None),
        ({"name": "d", "ingest": {"download": {"concurrency": 0}}}, "ingest.download.concurrency", None),
    ],
)
def test_spec_errors_name_the_field(data: dict, field: str, extra: str | None) -> None:
    with pytest.raises(SpecError) as info:
        build_spec(data, source="my spec")
    message = str(info.value)
    assert message.startswith("my spec is not valid:")
    assert f"  {field}: " in message
    if extra:
        assert extra in message


def test_several_errors_reported_together() -> None:
    with pytest.raises(SpecError) as info:
        build_spec({"name": "d", "ingest": {"images": {"image_size": -1, "resize_mode": "nope"}}})
    assert "ingest.images.image_size" in str(info.value)
    assert "ingest.images.resize_mode" in str(info.value)


def test_top_level_not_a_mapping_is_spec_error() -> None:
    with pytest.raises(SpecError):
        build_spec(["name", "d"])  # type: ignore[arg-type]


# --- load_spec ----------------------------------------------------------------------------------------------


def test_load_spec_resolves_relative_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    spec_file = folder / "ds.yaml"
    spec_file.write_text(
        "name: demo\n"
        "inputs:\n"
        "  - path: data/urls.parquet\n"
        "  - path: ../other/urls.csv\n"
        f"  - path: {tmp_path / 'abs.tsv'}\n"
        "  - path: s3://bucket/urls.parquet\n"
        "ingest:\n"
        "  images: {image_size: 128}\n",
        encoding="utf-8",
    )
    spec = load_spec(spec_file)
    assert isinstance(spec, DatasetSpec)
    assert [i.path for i in spec.inputs] == [
        str((folder / "data" / "urls.parquet").resolve()),
        str((tmp_path / "other" / "urls.csv").resolve()),
        str(tmp_path / "abs.tsv"),
        "s3://bucket/urls.parquet",
    ]
    assert spec.ingest.images.image_size == 128
    # Loading from another working directory gives the same result.
    assert load_spec(str(spec_file)) == spec


def test_load_spec_relative_spec_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.yml").write_text("name: demo\ninputs: [{path: urls.csv}]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    spec = load_spec("sub/s.yml")
    assert spec.inputs[0].path == str(tmp_path.resolve() / "sub" / "urls.csv")


def test_load_spec_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\ningest: {images: [\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"not valid YAML") as info:
        load_spec(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType"),
                                            ("42\n", "int")])
def test_load_spec_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=f"must be a YAML mapping, got {kind}"):
        load_spec(f)


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read dataset spec") as info:
        load_spec(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_load_spec_field_error_names_file_and_field(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("name: demo\ningest:\n  images:\n    image_size: -3\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert str(f) in str(info.value)
    assert "ingest.images.image_size" in str(info.value)


def test_load_spec_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match=r"s\.yaml is not UTF-8"):
        load_spec(f)


def test_shipped_example_specs_load() -> None:
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.y*ml"))
    if not examples:
        pytest.skip("no example specs shipped")
    for example in examples:
        spec = load_spec(example)
        assert spec.name
        assert all(Path(i.path).is_absolute() or "://" in i.path for i in spec.inputs)


# --- config hash --------------------------------------------------------------------------------------------


def _hash(**ingest) -> str:
    return build_spec({"name": "d", "ingest": ingest}).ingest.config_hash()


def test_config_hash_stable() -> None:
    assert IngestConfig().config_hash() == IngestConfig().config_hash()
    assert _hash() == IngestConfig().config_hash()
    # Spelling a default out changes nothing; neither does the order of CIDRs or directives.
    assert _hash(images={"image_size": 256}) == _hash()
    assert _hash(download={"allow_cidrs": ["127.0.0.0/8", "::1/128"]}) == \
        _hash(download={"allow_cidrs": ["::1/128", "127.0.0.0/8"]})
    assert len(_hash()) == 16 and all(c in "0123456789abcdef" for c in _hash())


@pytest.mark.parametrize(
    "change",
    [
        {"images": {"image_size": 512}},
        {"images": {"resize_mode": "center_crop"}},
        {"images": {"resize_only_if_bigger": True}},
        {"images": {"encode_format": "png"}},
        {"images": {"encode_quality": 90}},
        {"images": {"min_image_size": 64}},
        {"images": {"max_aspect_ratio": 3.0}},
        {"images": {"max_image_pixels": 1000}},
        {"download": {"respect_robots_txt": False}},
        {"download": {"respect_x_robots_tag": False}},
        {"download": {"disallowed_directives": ["noai"]}},
        {"download": {"allow_cidrs": ["127.0.0.0/8"]}},
        {"download": {"max_bytes": 1000}},
        {"download": {"max_redirects": 0}},
    ],
)
def test_config_hash_changes_with_output_fields(change: dict) -> None:
    assert _hash(**change) != _hash()


@pytest.mark.parametrize(
    "change",
    [
        {"download": {"concurrency": 8}},
        {"download": {"per_host": 2}},
        {"download": {"connect_timeout": 1.0}},
        {"download": {"read_timeout": 60.0}},
        {"download": {"total_timeout": 120.0}},
        {"download": {"retries": 5}},
        {"download": {"backoff": 2.0}},
    ],
)
def test_config_hash_ignores_performance_knobs(change: dict) -> None:
    assert _hash(**change) == _hash()


def test_download_config_cidr_validation_direct() -> None:
    assert DownloadConfig(allow_cidrs=("192.168.1.0/24",)).allow_cidrs == ("192.168.1.0/24",)
    with pytest.raises(ValidationError):
        DownloadConfig(allow_cidrs=("300.1.1.1/8",))
    with pytest.raises(ValidationError):
        ImageConfig(resize_mode="squash")  # type: ignore[arg-type]


# --- process settings ---------------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = Settings()
    assert s.store == DEFAULT_STORE
    assert s.s3_endpoint is None
    assert s.s3_secure is True
    assert s.dask_address is None


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFACTORY_STORE", "s3://b/p")
    monkeypatch.setenv("CAPFACTORY_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("CAPFACTORY_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("CAPFACTORY_S3_SECRET_KEY", "sk")
    monkeypatch.setenv("CAPFACTORY_S3_SECURE", "false")
    monkeypatch.setenv("CAPFACTORY_S3_REGION", "eu-west-1")
    monkeypatch.setenv("CAPFACTORY_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    monkeypatch.setenv("CAPFACTORY_DASK_WORKERS", "3")
    monkeypatch.setenv("CAPFACTORY_SOMETHING_ELSE", "ignored")
    s = Settings()
    assert (s.store, s.s3_endpoint, s.s3_access_key, s.s3_secret_key) == ("s3://b/p", "127.0.0.1:9000", "ak", "sk")
    assert s.s3_secure is False
    assert s.s3_region == "eu-west-1"
    assert s.dask_address == "tcp://127.0.0.1:8786"
    assert s.dask_workers == 3
    # Explicit arguments win over the environment.
    assert Settings(store="/tmp/x").store == "/tmp/x"


def test_settings_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFACTORY_DASK_WORKERS", "0")
    with pytest.raises(ValidationError, match="dask_workers"):
        Settings()
