"""CheckpointError, and the helper that keeps its messages short."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked.  The message names the file, the key, what was expected and
    what was found."""


def listing(names: Iterable[str], limit: int = 5) -> str:
    """'a, b, c, d, e (+12 more)' — the first few names of a long list and the count of the rest."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
