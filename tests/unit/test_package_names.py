"""playrec's top-level packages `batch`, `index`, `stream` cannot be silently replaced by another
distribution's package of the same name: the API checks where they come from (README, "Package names")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_api_imports_from_any_directory_with_its_own_packages(tmp_path):
    done = run("import playrec; playrec.check_packages(); print(playrec.ALS.__module__)", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "playrec.api"


def test_a_shadowing_package_is_named_with_what_to_do(tmp_path):
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "__init__.py").write_text("# someone else's package called batch\n")
    done = run("import playrec; playrec.ALS", tmp_path)  # the working directory comes first on sys.path
    assert done.returncode != 0
    assert "PackageShadowedError" in done.stderr and str(tmp_path / "batch") in done.stderr, done.stderr
    assert "virtual environment" in done.stderr
