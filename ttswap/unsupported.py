"""The one exception a rewriter raises when a pattern matched but this instance cannot run on the
device. It sits below the patterns so that the modules they use (activation mapping, specs) can raise
it too; its message becomes the node's fallback reason in the report."""

from __future__ import annotations


class Unsupported(Exception):
    """A pattern matched but this instance cannot run on the device; the message says why."""


__all__ = ["Unsupported"]
