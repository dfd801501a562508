"""The faust-streaming and aiokafka versions the worker is built against.

`stream/ingest.py` (the fetch-result ingest path) and `stream/changelog.py` (the bulk changelog
writer) follow private internals of these two libraries (faust's consumer fetch loop and read
offsets, aiokafka's producer batches). A different release can change them without notice, so the
worker refuses to start on any other version instead of miscounting; pyproject.toml pins the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata

#: distribution -> the one version whose internals stream/ingest.py and stream/changelog.py follow
SUPPORTED: dict[str, str] = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}


class UnsupportedVersionError(RuntimeError):
    """An installed faust-streaming or aiokafka is not the version the worker was built against."""


def check_versions(
    supported: Mapping[str, str] = SUPPORTED, installed: Callable[[str], str] = metadata.version
) -> None:
    """Raise UnsupportedVersionError naming every mismatch (and the pip command that fixes it)."""
    wrong = []
    for dist, want in supported.items():
        try:
            have = installed(dist)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != want:
            wrong.append((dist, want, have))
    if wrong:
        found = ", ".join(f"{dist} {have} (needs {want})" for dist, want, have in wrong)
        fix = " ".join(f"{dist}=={want}" for dist, want, _ in wrong)
        raise UnsupportedVersionError(
            f"the stream worker follows internals of exact library versions and found {found}; "
            f"install them with: pip install {fix}"
        )
