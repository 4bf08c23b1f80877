"""The command line's shared conventions: --version, defaults in --help, a quiet clean run, the spec stored with
the dataset, and the hints a summary gives for what a user can fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.ingest import IngestStage

REPO = Path(__file__).resolve().parents[1]


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"capfactory {version('capfactory')}"


def test_urls_refused_by_the_ssrf_guard_are_explained_on_the_console():
    result = {"counts": {"error": 5}, "error_classes": {"blocked": 5}, "new_samples": 5}
    lines = IngestStage().summary(result)
    assert any("refused by the SSRF guard" in line and "--allow-cidr 127.0.0.0/8" in line for line in lines)
    assert not any("SSRF" in line for line in IngestStage().summary({"counts": {"ok": 5}, "error_classes": {}}))


def test_help_shows_the_default_of_every_option():
    import typer

    from flows.cli import app

    def commands(group, prefix: str = ""):  # typer's own (vendored) click groups and commands
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    missing = []
    for name, command in commands(typer.main.get_command(app)):
        if name.startswith("models "):  # another command group's options
            continue
        for param in command.params:
            shown = isinstance(param.show_default, str) or param.default is not None
            if param.param_type_name == "option" and not shown:
                missing.append(f"{name} --{param.name}")
    assert not missing, missing
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert "[default: ($CAPFACTORY_STORE or ./capfactory-data)]" in proc.stdout
    assert "[default: (1000)]" in proc.stdout and "[default: no-retry-failed]" in proc.stdout


@pytest.mark.slow
def test_a_clean_run_prints_its_start_the_dashboard_and_the_summary_only(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in photos[:3]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPFACTORY_", "PREFECT_API_URL"))}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(folder), "--dataset", "quiet", "--store",
                           str(tmp_path / "store"), "--workers", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    # What comes before the work: which spec, that Prefect and Dask start, and where the dashboard is; nothing else
    # (no Prefect banner or task logs, no nanny warnings, no tracebacks).
    assert proc.stderr.splitlines()[:2] == ["spec: none (defaults and command-line options)",
                                            "starting a Prefect API and a Dask cluster (1 workers)..."], proc.stderr
    assert re.fullmatch(r"Dask dashboard: http://\S+:\d+/status", proc.stderr.splitlines()[2]), proc.stderr
    assert len(proc.stderr.splitlines()) == 3, proc.stderr
    assert "ingest of quiet" in proc.stdout and "status: ok=3" in proc.stdout


@pytest.mark.slow
def test_publish_without_spec_uses_the_spec_stored_with_the_dataset(tmp_path):
    """A run given --spec keeps it in the store (`<dataset>/_spec.yaml`); a later `publish` without --spec applies
    its filters (the bug: they were silently dropped), and an explicit --spec still wins."""
    from test_publish import QUALITY, add_stages, copy_raw, make_store

    store = make_store(tmp_path)
    copy_raw(store, "bare", "kept")
    add_stages(store, "kept", [0, 1, 2])
    filtered = tmp_path / "filtered.yaml"
    filtered.write_text(yaml.safe_dump({"name": "kept", "score": QUALITY.model_dump(mode="json",
                                                                                    exclude_defaults=True)}))
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: kept\n")

    def publish(*args: str) -> tuple[dict, str]:
        out = tmp_path / "result.json"
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "publish", "--dataset", "kept", "--store",
                               store.uri, "--workers", "1", "--json", str(out), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(out.read_text()), proc.stderr

    first, err = publish("--spec", str(filtered))
    assert f"spec: {filtered}" in err and first["selected"] == 4  # the clip_min filter drops one sample
    assert yaml.safe_load(store.get_bytes("kept/_spec.yaml"))["score"]["filters"]["clip_min"] == {"short": 0.2}
    again, err = publish()
    assert "spec: the one stored with the dataset" in err and again["selected"] == 4
    unfiltered, _ = publish("--spec", str(plain))
    assert unfiltered["selected"] == 5
