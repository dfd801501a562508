"""The worker refuses faust-streaming / aiokafka versions whose internals it does not follow."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from stream.versions import SUPPORTED, UnsupportedVersionError, check_versions

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_versions_are_the_supported_ones():
    check_versions()
    assert {dist: metadata.version(dist) for dist in SUPPORTED} == SUPPORTED


def test_pyproject_pins_exactly_the_checked_versions():
    text = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'^\s*"([\w-]+)==([\w.]+)",', text, flags=re.M))
    assert {dist: pins.get(dist) for dist in SUPPORTED} == SUPPORTED


def test_another_version_is_refused_with_the_fix():
    versions = {"faust-streaming": "0.11.3", "aiokafka": "0.14.0"}
    with pytest.raises(UnsupportedVersionError, match=r"faust-streaming 0\.11\.3 \(needs 0\.15\.3\)") as err:
        check_versions(installed=versions.__getitem__)
    assert "pip install faust-streaming==0.15.3" in str(err.value)
    assert "aiokafka==" not in str(err.value)


def test_a_missing_distribution_is_refused():
    def installed(dist: str) -> str:
        raise metadata.PackageNotFoundError(dist)

    with pytest.raises(UnsupportedVersionError, match="aiokafka not installed"):
        check_versions(installed=installed)
