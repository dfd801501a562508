"""playrec: a streaming music recommender.

The Python API (playrec.api): `ALS`, `PlayCounts`, `ModelStore`, `ALSModel`, `Scored`; the application
layer: the command line (playrec.cli), the development Kafka broker (playrec.devbroker), the demo.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ALS", "ALSModel", "Evaluation", "ModelStore", "PlayCounts", "Scored"]

if TYPE_CHECKING:
    from playrec.api import ALS, ALSModel, Evaluation, ModelStore, PlayCounts, Scored


#: playrec's other top-level packages (the design's layout: README, "Package names")
PACKAGES = ("batch", "index", "stream")


class PackageShadowedError(ImportError):
    """Another distribution's package of the same name is imported instead of one of playrec's."""


def check_packages() -> None:
    """Raise PackageShadowedError when `batch`, `index` or `stream` resolve to another distribution's
    package than the ones installed beside this one (they are top-level names: README, "Package names")."""
    home = Path(__file__).resolve().parents[1]
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or origin.parent.parent != home:
            raise PackageShadowedError(
                f"the package {name!r} imported here is {origin or 'missing'}, not playrec's ({home / name}): "
                f"another distribution or a folder named {name!r} earlier on sys.path shadows it; uninstall it, "
                "or run playrec in its own virtual environment"
            )


def __getattr__(name: str) -> Any:
    """The API names, imported on first use (the CLI and the broker start without numpy/scipy)."""
    if name in __all__:
        check_packages()
        from playrec import api

        return getattr(api, name)
    raise AttributeError(f"module 'playrec' has no attribute {name!r}")
