"""The command line's shared conventions: --version, and the hints a summary gives for what a user can fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
