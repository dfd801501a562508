"""playrec: a streaming music recommender.

The Python API (playrec.api): `ALS`, `PlayCounts`, `ModelStore`, `ALSModel`, `Scored`; the application
layer: the command line (playrec.cli), the development Kafka broker (playrec.devbroker), the demo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ALS", "ALSModel", "Evaluation", "ModelStore", "PlayCounts", "Scored"]

if TYPE_CHECKING:
    from playrec.api import ALS, ALSModel, Evaluation, ModelStore, PlayCounts, Scored


def __getattr__(name: str) -> Any:
    """The API names, imported on first use (the CLI and the broker start without numpy/scipy)."""
    if name in __all__:
        from playrec import api

        return getattr(api, name)
    raise AttributeError(f"module 'playrec' has no attribute {name!r}")
