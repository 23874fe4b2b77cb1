"""Pattern rewriters. Each module in this folder registers its own patterns when imported; adding a
pattern means adding one file here."""

from __future__ import annotations

import importlib
import pkgutil

from ttswap.patterns.registry import (BuildContext, LayerContext, Rewriter, Unsupported, register, rewriters,
                                     rewriters_at)

_SKIP = {"matcher", "registry", "convs"}  # support modules, not patterns
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SKIP:
        importlib.import_module(f"{__name__}.{_info.name}")


def rewriter_names() -> list[str]:
    return sorted({r.name for r in rewriters()})


__all__ = ["BuildContext", "LayerContext", "Rewriter", "Unsupported", "register", "rewriters", "rewriters_at",
           "rewriter_names"]
