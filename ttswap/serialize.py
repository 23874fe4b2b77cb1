"""Saving and loading converted models, without pickles.

    converted.save("yolov4_320.safetensors")
    converted = ttswap.load("yolov4_320.safetensors", backend="ttnn")

A saved model is one safetensors file: the original model's weights (its state dict, as given to
``convert``) and, in the file's metadata, JSON for

* how to build the model again: a timm model name, or ``module:callable`` with keyword arguments;
* the recipe (as the tables of a recipe file), the input shape, and the backend it was converted on;
* the graph description: every traced node, what replaced it and with which config (the report);
* a sha256 of the weights, the file format version and the ttswap version that wrote it.

``load`` builds the model, loads the weights strictly and checks their digest, converts with the
saved recipe, and checks the conversion against the saved graph description, so a ttswap that would
convert the model differently (other patterns, other configs) fails and names the differences
instead of running something other than what was saved.

Why the original weights rather than the converted layers: prepared weights are backend-specific
(the ttnn backend's are device tensors, laid out by the first conv2d call), and a converted graph
keeps torch modules for fallbacks, which only pickling could store, and ttswap never unpickles.
Converting again is exact, and with the weight cache (``ttswap.cache``) a fraction of a first
conversion's time. The price: the model must be rebuildable from a name, so ``save`` checks that it
is (on the meta device, which allocates nothing) before writing anything.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttswap.cache import weights_digest
from ttswap.converter import ConvertedModel, convert, register_saver
from ttswap.recipe import Recipe
from ttswap.report import ConversionReport


FORMAT = 1
_IMPORT_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TIMM_PREFIXES = ("hf_hub:", "hf-hub:", "local-dir:")


class SerializationError(RuntimeError):
    """A saved model cannot be written or read; the message says why."""


# -- building models by name -------------------------------------------------------------------------


def build_model(ref: str, kwargs: dict[str, Any] | None = None, *, pretrained: bool = False) -> nn.Module:
    """``module:callable`` (e.g. ``ttswap.models.yolov4:YOLOv4``) called with ``kwargs``, or a timm
    model name passed to ``timm.create_model``. Returns the model in eval mode."""
    kwargs = dict(kwargs or {})
    if is_import_ref(ref):
        if pretrained:
            raise ValueError(f"pretrained weights come from timm; {ref!r} is not a timm name (pass weights instead)")
        module_name, qualname = ref.split(":")
        try:
            factory = functools.reduce(getattr, qualname.split("."), importlib.import_module(module_name))
        except (ImportError, AttributeError) as exc:
            raise SerializationError(f"cannot import {ref!r}: {exc}") from None
        model = factory(**kwargs)
    else:
        import timm

        try:
            model = timm.create_model(ref, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" not in str(exc):
                raise
            raise SerializationError(f"{ref!r} is neither a timm model name nor module:callable") from None
    if not isinstance(model, nn.Module):
        raise SerializationError(f"{ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def is_import_ref(ref: str) -> bool:
    return bool(_IMPORT_REF.match(ref)) and not ref.startswith(_TIMM_PREFIXES)


def model_ref_of(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """How to build ``model`` again: timm's architecture name for a timm model, else its class."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs = {"num_classes": model.num_classes} if isinstance(getattr(model, "num_classes", None), int) else {}
        return cfg["architecture"], kwargs
    kind = type(model)
    if kind.__module__ == "__main__" or "<locals>" in kind.__qualname__:
        raise SerializationError(f"{kind.__qualname__} is defined in a script or function, so load could not import it: "
                                 "move it into a module and pass model_ref='package.module:callable'")
    return f"{kind.__module__}:{kind.__qualname__}", {}


def _check_rebuilds(model: nn.Module, ref: str, kwargs: dict[str, Any]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with torch.device("meta"):  # nothing allocated, nothing initialised
            built = build_model(ref, kwargs)
    except Exception as exc:
        raise SerializationError(f"load could not rebuild the model as {ref!r}({_kwargs(kwargs)}): {exc}; "
                                 "pass model_ref= (and model_kwargs=)") from None
    got = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise SerializationError(f"{ref!r}({_kwargs(kwargs)}) builds a model whose weights differ from this one's "
                                 f"(first: {differ[:3]}); pass model_ref= (and model_kwargs=)")


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# -- save / load -------------------------------------------------------------------------------------


def save(converted: "ConvertedModel", path: str | Path, *, model_ref: str | None = None,
         model_kwargs: dict[str, Any] | None = None) -> Path:
    """Write ``converted`` to ``path`` (see the module docstring). ``model_ref`` names how to build the
    model (``module:callable`` or a timm name); by default it is inferred and checked."""
    from safetensors.torch import save_model

    from ttswap._version import __version__

    source = converted.source
    if source is None:
        raise SerializationError("this converted model does not record the model it came from; convert it with ttswap.convert")
    model = source.model
    if weights_digest(model) != source.fingerprint.weights:
        raise SerializationError("the model's weights changed after it was converted; convert it again, then save")
    if model_ref is None:
        model_ref, inferred = model_ref_of(model)
        model_kwargs = inferred if model_kwargs is None else model_kwargs
    model_kwargs = dict(model_kwargs or {})
    _check_rebuilds(model, model_ref, model_kwargs)
    try:
        json.dumps(model_kwargs)
    except TypeError as exc:
        raise SerializationError(f"model_kwargs must be JSON data: {exc}") from None

    metadata = {
        "ttswap.format": str(FORMAT),
        "ttswap.version": __version__,
        "ttswap.model": json.dumps({"ref": model_ref, "kwargs": model_kwargs}),
        "ttswap.recipe": json.dumps(converted.recipe.to_tables()),
        "ttswap.input_shape": json.dumps(list(converted.input_shape)),
        "ttswap.backend": converted.report.backend,
        "ttswap.weights_sha256": source.fingerprint.weights,
        "ttswap.graph": json.dumps(graph_description(converted.report)),
    }
    path = Path(path)
    save_model(model, str(path), metadata=metadata)  # drops tied duplicates; load_model restores them
    return path


def load(path: str | Path, *, backend: str = "auto", cache: "bool | str | Path" = True) -> "ConvertedModel":
    """Convert a saved model again, on ``backend``; see the module docstring. Raises
    ``SerializationError`` for a file that is not a saved model, is corrupt, or was written by a ttswap
    that converts it differently."""
    from safetensors.torch import load_model

    from ttswap._version import __version__

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved ttswap model at {path}")
    header = _header(path)
    model_info = _field(header, path, "ttswap.model")
    model = build_model(model_info["ref"], model_info["kwargs"])
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:
        raise SerializationError(f"{path}: its weights do not fit {model_info['ref']!r}: {exc}") from None
    if missing or unexpected:
        raise SerializationError(f"{path}: its weights do not fit {model_info['ref']!r}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    if weights_digest(model) != header.get("ttswap.weights_sha256"):
        raise SerializationError(f"{path} is corrupt: its weights do not match the digest saved with them")
    recipe = Recipe.from_dict(_field(header, path, "ttswap.recipe"), source=f"{path} (saved recipe)")
    converted = convert(model, recipe, input_shape=tuple(_field(header, path, "ttswap.input_shape")),
                        backend=backend, cache=cache)
    saved, now = _field(header, path, "ttswap.graph"), graph_description(converted.report)
    if saved != now:
        raise SerializationError(_graph_difference(path, header["ttswap.version"], __version__, saved, now))
    return converted


def _header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise SerializationError(f"{path} is not a readable safetensors file: {exc}") from None
    if "ttswap.format" not in header:
        raise SerializationError(f"{path} is a safetensors file but not a saved ttswap model")
    if header["ttswap.format"] != str(FORMAT):
        from ttswap._version import __version__

        raise SerializationError(f"{path} was saved in format {header['ttswap.format']} by ttswap "
                                 f"{header.get('ttswap.version', '?')}; ttswap {__version__} reads format {FORMAT}")
    return header


def _field(header: dict[str, str], path: Path, key: str) -> Any:
    try:
        return json.loads(header[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise SerializationError(f"{path} is corrupt: metadata field {key!r} is missing or not JSON ({exc})") from None


# -- descriptions ------------------------------------------------------------------------------------


def graph_description(report: ConversionReport) -> list[dict[str, Any]]:
    """Per traced node: what it computes, what replaced it, in which layer, with which config."""
    return [{"node": r.node, "op": r.op, "replacement": r.replacement, "layer": r.layer,
             "config": r.config.to_dict() if r.config else None} for r in report.records]


def _graph_difference(path: Path, saved_version: str, version: str, saved: list, now: list) -> str:
    by_node = {d["node"]: d for d in now}
    saved_nodes = {d["node"] for d in saved}
    lines = [_node_change(d, by_node.get(d["node"])) for d in saved if by_node.get(d["node"]) != d]
    lines += [f"node {d['node']}: new ({d['op']})" for d in now if d["node"] not in saved_nodes]
    shown = "\n".join(f"  {line}" for line in lines[:8])
    return (f"{path} was saved by ttswap {saved_version}; ttswap {version} converts it differently "
            f"({len(lines)} node(s) differ, saved -> now):\n{shown}")


def _node_change(saved: dict[str, Any], now: dict[str, Any] | None) -> str:
    if now is None:
        return f"node {saved['node']}: no longer traced"
    changes = []
    for key, value in saved.items():
        if key == "config" and value and now["config"]:
            changes += [f"config.{k} {v!r} -> {now['config'].get(k)!r}" for k, v in value.items() if now["config"].get(k) != v]
        elif now.get(key) != value:
            changes.append(f"{key} {value!r} -> {now.get(key)!r}")
    return f"node {saved['node']}: " + ", ".join(changes)


register_saver(save)  # ConvertedModel.save writes through this module

__all__ = ["FORMAT", "SerializationError", "build_model", "graph_description", "is_import_ref", "load",
           "model_ref_of", "save"]
