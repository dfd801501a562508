"""Exception classes raised by the hyperplane forest, one per kind of caller mistake."""

from __future__ import annotations


class ForestError(Exception):
    """Base class of every error raised by :mod:`index`."""


class UnknownMetricError(ForestError, ValueError):
    """The metric name is not one of ``"dot"``, ``"cosine"``, ``"euclidean"``."""


class DimensionError(ForestError, ValueError):
    """An array has the wrong shape, dimension or contains non-finite values."""


class NotBuiltError(ForestError, RuntimeError):
    """The forest was queried or modified before :meth:`HyperplaneForest.build`."""


class DuplicateIdError(ForestError, ValueError):
    """An id given to ``build``/``add`` is repeated or already in the forest."""


class UnknownIdError(ForestError, KeyError):
    """An id given to ``remove`` is not in the forest."""


class IdTypeError(ForestError, TypeError):
    """Ids are neither all strings nor all integers, or do not match the forest's id kind."""


class StorageError(ForestError, OSError):
    """A saved forest is missing files, has an unknown format version or inconsistent arrays."""
