"""The weight cache: converting the same model with the same recipe on the same backend again skips
the expensive steps of the first conversion.

A conversion spends its time running the model once in fp32 for shape propagation, folding
BatchNorm, measuring the bfloat8_b guard's error and preparing weights (quantizing, splitting into
fidelity operands); their shares depend on the model and recipe (``benchmarks/cache_speedup.py
--profile`` measures them). The cache keeps the results of all four, per conversion, in one
safetensors file:

* the tensor metadata shape propagation recorded on every traced node;
* per conv layer, the error the bfloat8_b guard measured (the guard's decision is taken again, from
  the recipe);
* per conv and linear layer (convs, classifier heads, squeeze-excitation), the backend's prepared
  weights when they are plain torch tensors (the emulated backend: BatchNorm folded, quantized to the
  weight dtype, split into fidelity operands); otherwise the (BatchNorm-folded) fp32 weight and bias
  that ``prepare_conv``/``prepare_linear`` take. The ttnn backend prepares ttnn tensors, which cannot
  be stored: its host-side preparation is one ``from_torch`` per layer and the device-side weight
  layout is made by the first ``conv2d`` call, so both are redone.

A hit maps the file's tensors into memory instead of copying them (writes to them stay private).
The file is named by the cache key, a sha256 of the model structure (module tree and traced graph),
every parameter and buffer, the recipe, the input shape, the backend, the versions of ttswap, torch
and ttnn, and ttswap's own source code, so that an edited numerics model never reuses stale weights.
The file's metadata repeats the key and the format version and holds a CRC32 of every tensor; a file
that does not parse, belongs to another key or format, or fails a CRC is reported with a
``CacheWarning``, deleted and rebuilt, never used.

The file stores what a hit needs and nothing it can rebuild for free: a weight's ``high`` fidelity
operand is its ``full`` operand with mantissa bits masked off, so only ``full`` is stored (checked bit
for bit when writing; this halves the emulated backend's files) and a hit masks it again when a layer
first reads it: never for HiFi2 and HiFi4 layers, which read only ``full``.

Location: ``convert(cache=...)`` (a directory; ``True``, the default, for the default directory;
``False`` disables the cache), else ``$TTSWAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttswap/weights``
(``~/.cache/ttswap/weights``). Size: after each write the least recently used files beyond the cap
(``convert(cache_max_bytes=...)``, else ``$TTSWAP_CACHE_MAX_BYTES``, else 2 GiB) are deleted, except
files other conversions are reading. Locking, atomic writes and eviction: ``ttswap.cache_store``.
A file that cannot be written (read-only directory, full disk) costs one ``CacheWarning``; the
conversion goes on uncached. ``ttswap cache info | prune | clear`` shows and manages the directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ttswap.backends.base import Backend
from ttswap.backends.numerics import srca_operand
from ttswap.cache_store import (ENV_DIR, ENV_MAX_BYTES, EntryLock, cache_dir, default_dir, max_bytes, prune,
                                 write_atomically)
from ttswap.recipe import Recipe
from ttswap.trace import propagate_shapes

log = logging.getLogger("ttswap")

FORMAT = 2  # 2: derived tensors are not stored; the header says what the entry is
ENV_VAR = ENV_DIR

T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache file could not be used (and is being rebuilt) or written."""


class _Unusable(Exception):
    pass


# -- the key ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """sha256 digests of everything a conversion's result depends on."""

    structure: str  # module tree and traced graph
    weights: str  # every parameter and buffer
    setup: str  # recipe, input shape, backend, versions, ttswap's source

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.structure}:{self.weights}:{self.setup}".encode()).hexdigest()[:40]

    @classmethod
    def of(cls, gm: fx.GraphModule, model: nn.Module, recipe: Recipe, backend: Backend,
           input_shape: Sequence[int]) -> "Fingerprint":
        """``gm`` is ``model`` traced (before any rewriting)."""
        structure = hashlib.sha256(f"{model!r}\n{gm.code}".encode()).hexdigest()
        recipe_data = {k: v for k, v in recipe.to_dict().items() if k != "source"}
        setup = json.dumps({"format": FORMAT, "recipe": recipe_data, "input_shape": list(input_shape),
                            "versions": _versions(backend.name), "source": _source_digest()}, sort_keys=True)
        return cls(structure, weights_digest(model), hashlib.sha256(setup.encode()).hexdigest())


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(_raw_bytes(tensor))
    return h.hexdigest()


def _versions(backend: str) -> dict[str, str]:
    from ttswap._version import __version__

    versions = {"backend": backend, "ttswap": __version__, "torch": torch.__version__}
    if backend == "ttnn":
        versions["ttnn"] = importlib.metadata.version("ttnn")
    return versions


@functools.cache
def _source_digest() -> str:
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> memoryview:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


# -- one conversion's entries ----------------------------------------------------------------------


class ConversionCache:
    """One conversion's use of the cache: entries read from its file, and entries computed now, which
    ``save`` writes back. A disabled cache (``path`` None) computes everything and stores nothing.

    A file being read is locked (shared) from ``open`` until ``save`` or ``close``, so that no
    eviction deletes it meanwhile."""

    def __init__(self, path: Path | None = None, key: str = "", limit: int | None = None,
                 about: dict[str, str] | None = None):
        self.path, self.key = path, key
        self.limit = max_bytes() if limit is None and path is not None else limit
        self.about = dict(about or {})  # what `ttswap cache info` shows: model, recipe, backend, input shape
        self.hit = False  # a usable file was found
        self._entries: dict[str, Any] = {"shapes": None, "values": {}, "prepared": {}}
        self._tensors: dict[str, torch.Tensor] = {}
        self._derived: dict[str, _Derived] = {}  # read from the file: computed when first used
        self._dirty = False
        self._lock: EntryLock | None = None

    @classmethod
    def open(cls, directory: Path | None, fingerprint: Fingerprint, limit: "int | str | None" = None,
             about: dict[str, str] | None = None) -> "ConversionCache":
        """``limit``: the directory's cap in bytes (None: ``$TTSWAP_CACHE_MAX_BYTES`` or the default)."""
        if directory is None:
            return cls()
        cache = cls(directory / f"{fingerprint.key}.safetensors", fingerprint.key, max_bytes(limit), about)
        cache._load()
        return cache

    def propagate_shapes(self, gm: fx.GraphModule, example: torch.Tensor) -> None:
        """Record every node's tensor metadata: from the file, or by running ``example`` through ``gm``."""
        saved = self._entries["shapes"]
        if saved is not None:
            for node in gm.graph.nodes:
                if node.name in saved:
                    node.meta["tensor_meta"] = _decode_meta(saved[node.name])
            return
        propagate_shapes(gm, example)
        if self.path is None:
            return
        encoded = {n.name: _encode_meta(n.meta["tensor_meta"]) for n in gm.graph.nodes if "tensor_meta" in n.meta}
        if all(v is not None for v in encoded.values()):  # else (quantized tensors, odd outputs) run it each time
            self._entries["shapes"] = encoded
            self._dirty = True

    def value(self, name: str, compute: Callable[[], float]) -> float:
        if self.path is None:
            return float(compute())
        values = self._entries["values"]
        if name not in values:
            values[name] = float(compute())
            self._dirty = True
        return values[name]

    def prepared(self, name: str, inputs: Callable[[], Sequence[torch.Tensor | None]], prepare: Callable[..., T]) -> T:
        """``prepare(*inputs())``, cached: the result itself when it is a dataclass of torch tensors,
        else the inputs (so a hit still calls ``prepare``, but not ``inputs``)."""
        if self.path is None:
            return prepare(*inputs())
        entry = self._entries["prepared"].get(name)
        if entry is not None and entry["kind"] == "result":
            return _rebuild(entry, self._tensors, self._derived)
        if entry is not None:
            return prepare(*(None if n is None else self._tensors[n] for n in entry["inputs"]))
        args = tuple(inputs())
        result = prepare(*args)
        flat = _flatten(name, result)
        if flat is not None:
            entry, tensors = flat
        else:
            names = [None if a is None else f"{name}/input{i}" for i, a in enumerate(args)]
            entry = {"kind": "inputs", "inputs": names}
            tensors = {n: a for n, a in zip(names, args) if n is not None}
        self._entries["prepared"][name] = entry
        self._tensors.update(tensors)
        self._dirty = True
        return result

    def save(self) -> None:
        """Write the file if this conversion computed anything new, then evict beyond the cap, and end
        this conversion's use of the file. A file that cannot be written costs one warning."""
        try:
            if self.path is not None and self._dirty:
                self._write()
        finally:
            self.close()

    def close(self) -> None:
        """End this conversion's use of the file: eviction may delete it again."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- writing -------------------------------------------------------------------------------------
    def _write(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        assert self.path is not None and self.limit is not None
        stored, index = _stored_tensors(self._tensors)
        index.update({name: d.index() for name, d in self._derived.items()})  # a hit that computed more
        header = {"ttswap.format": str(FORMAT), "ttswap.key": self.key, "ttswap.created": str(time.time()),
                  "ttswap.about": json.dumps(self.about), "ttswap.entries": json.dumps(self._entries),
                  "ttswap.tensors": json.dumps(index)}
        size = sum(t.numel() * t.element_size() for t in stored.values())
        if size > self.limit:
            log.info("weight cache: not written: its %.0f MB exceed the cap of %.0f MB (%s)", size / 1e6,
                     self.limit / 1e6, ENV_MAX_BYTES)
            return
        try:
            write_atomically(self.path, lambda temp: save_file(stored, str(temp), metadata=header))
        except (OSError, SafetensorError) as exc:
            reason = f"{exc.strerror} [errno {exc.errno}]" if isinstance(exc, OSError) and exc.strerror else str(exc)
            warnings.warn(f"weight cache: could not write {self.path} ({reason}); converted without caching",
                          CacheWarning, stacklevel=4)
            return
        self._dirty = False
        log.info("weight cache: wrote %s (%.0f MB)", self.path, self.path.stat().st_size / 1e6)
        prune(self.path.parent, self.limit, keep=self.path)

    # -- reading -------------------------------------------------------------------------------------
    def _load(self) -> None:
        assert self.path is not None
        try:
            lock = EntryLock.acquire(self.path)
        except OSError as exc:  # e.g. the directory is a file, or not readable
            warnings.warn(f"weight cache: cannot read {self.path.parent} ({exc.strerror} [errno {exc.errno}]); "
                          "converted without caching", CacheWarning, stacklevel=4)
            self.path = None  # and no write: one warning is enough
            return
        if lock is None:
            log.info("weight cache: miss, will write %s", self.path)
            return
        try:
            self._entries, self._tensors, self._derived = _read(lock.readable_path, self.key)
        except Exception as exc:  # whatever is wrong with the file, it must not be used
            warnings.warn(f"weight cache file {self.path} is unusable ({exc}); rebuilding it", CacheWarning,
                          stacklevel=4)
            lock.remove()
            lock.release()
            return
        self.hit = True
        self._lock = lock  # held until save(): no eviction meanwhile
        lock.touch()  # recently used: evicted last
        log.info("weight cache: hit %s", self.path)


# Tensors a hit derives from another tensor of the same entry instead of reading them: (name suffix,
# suffix of the tensor it is derived from, derivation on the stored form). A weight's ``high`` SrcA
# operand is its ``full`` operand with more mantissa bits masked off; masking is elementwise, so it
# applies to the stored (NHWC) memory as well.
_DERIVED: tuple[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]], ...] = (
    ("/high", "/full", lambda full: srca_operand(full, "high")),
)


@dataclass(frozen=True)
class _Derived:
    """A tensor of a hit that is computed from a stored one, when it is first read: a layer whose
    fidelity never reads its ``high`` operand (HiFi2, HiFi4) never pays for it."""

    source: str
    rule: int
    stored: torch.Tensor  # the source as the file holds it
    info: dict[str, Any]

    def compute(self) -> torch.Tensor:
        return _from_file(_DERIVED[self.rule][2](self.stored), self.info)

    def index(self) -> dict[str, Any]:
        return {"derived_from": self.source, "rule": self.rule}


class _LazyTensors(Mapping):
    """A dict field of a cached result (e.g. ``PreparedWeights.operands``) whose derived tensors are
    computed on first access."""

    def __init__(self, items: dict[str, "torch.Tensor | _Derived"]):
        self._items = items

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._items[key]
        if isinstance(value, _Derived):
            value = self._items[key] = value.compute()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _stored_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write and the index describing every tensor (stored or derived)."""
    derived = {name: d for name, t in tensors.items() if (d := _derivation(name, t, tensors)) is not None}
    stored, index, seen = {}, {}, set()
    for name, tensor in tensors.items():
        if name in derived:
            index[name] = {"derived_from": derived[name][0], "rule": derived[name][1]}
        else:
            stored[name], index[name] = _to_file(tensor, seen)
    return stored, index


def _derivation(name: str, tensor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(source tensor, rule index) when ``tensor`` is bit for bit a rule applied to a sibling."""
    for rule, (suffix, source_suffix, derive) in enumerate(_DERIVED):
        source = name.removesuffix(suffix) + source_suffix
        if name.endswith(suffix) and source in tensors and tensor.dtype == torch.float32:
            candidate = derive(tensors[source].detach().cpu())
            if candidate.shape == tensor.shape and torch.equal(candidate.view(torch.int32),
                                                               tensor.detach().cpu().view(torch.int32)):
                return source, rule
    return None


def _read(path: "str | Path", key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, "_Derived"]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("ttswap.format") != str(FORMAT):
            raise _Unusable(f"format {header.get('ttswap.format')!r}, this ttswap reads format {FORMAT}")
        if header.get("ttswap.key") != key:
            raise _Unusable(f"it holds key {header.get('ttswap.key')!r}, not {key!r}")
        index = json.loads(header["ttswap.tensors"])
        if set(f.keys()) != {name for name, info in index.items() if "derived_from" not in info}:
            raise _Unusable("its tensors differ from its index")
        stored, tensors = {}, {}
        for name in f.keys():
            stored[name] = f.get_tensor(name)
            if zlib.crc32(_raw_bytes(stored[name])) != index[name]["crc"]:
                raise _Unusable(f"checksum mismatch in {name!r}")
            tensors[name] = _from_file(stored[name], index[name])
        derived = {}
        for name, info in index.items():
            if "derived_from" in info:
                source, rule = info["derived_from"], info["rule"]
                if source not in stored or not 0 <= rule < len(_DERIVED):
                    raise _Unusable(f"{name!r} is derived from {source!r} by rule {rule}, which it lacks")
                derived[name] = _Derived(source, rule, stored[source], index[source])
    return json.loads(header["ttswap.entries"]), tensors, derived


def describe_conversion(model: nn.Module, recipe: Recipe, backend: Backend,
                        input_shape: Sequence[int]) -> dict[str, str]:
    """What ``ttswap cache info`` shows of an entry: the model (timm's architecture name when it has one),
    recipe, backend and input shape."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    name = pretrained_cfg.get("architecture") if isinstance(pretrained_cfg, dict) else None
    return {"model": name or type(model).__name__, "recipe": recipe.name, "backend": backend.name,
            "input_shape": "x".join(map(str, input_shape))}


def about(path: Path) -> dict[str, str]:
    """What an entry file says it is (model, recipe, backend, input shape, created), for ``ttswap cache
    info``; ``{"error": ...}`` when its header cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        info = json.loads(header.get("ttswap.about", "{}"))
        info["format"] = header.get("ttswap.format", "?")
        if "ttswap.created" in header:
            info["created"] = header["ttswap.created"]
        return info
    except Exception as exc:  # damaged: a conversion that reads it rebuilds it
        return {"error": f"unreadable ({exc})"}


def _to_file(t: torch.Tensor, seen: set[int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """A tensor as stored: channels-last weights as their NHWC memory, so that they load with the
    same strides; in their own dtype, so that loading maps the file instead of converting (storing
    quantized weights as bfloat16 would halve the file but double a hit's time); storage never shared."""
    t = t.detach().cpu()
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    stored = t.permute(0, 2, 3, 1) if channels_last else t.contiguous()
    info = {"channels_last": channels_last}
    if stored.untyped_storage().data_ptr() in seen:
        stored = stored.clone()
    seen.add(stored.untyped_storage().data_ptr())
    info["crc"] = zlib.crc32(_raw_bytes(stored))
    return stored, info


def _from_file(stored: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    return stored.permute(0, 3, 1, 2) if info["channels_last"] else stored


def _flatten(name: str, obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """A dataclass whose fields are tensors, dicts of tensors or None, as an entry and named tensors;
    None for anything else."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return None
    fields: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.init:
            return None
        if value is None:
            fields[f.name] = None
        elif isinstance(value, torch.Tensor):
            fields[f.name] = f"{name}/{f.name}"
            tensors[fields[f.name]] = value
        elif isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
            fields[f.name] = {k: f"{name}/{f.name}/{k}" for k in value}
            tensors.update({fields[f.name][k]: v for k, v in value.items()})
        else:
            return None
    kind = type(obj)
    return {"kind": "result", "class": f"{kind.__module__}:{kind.__qualname__}", "fields": fields}, tensors


def _rebuild(entry: dict[str, Any], tensors: dict[str, torch.Tensor], derived: dict[str, _Derived]) -> Any:
    module, qualname = entry["class"].split(":")
    if module != "ttswap" and not module.startswith("ttswap."):
        raise _Unusable(f"entry class {entry['class']!r} is not ttswap's")
    kind = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    fields = {}
    for field, spec in entry["fields"].items():
        if spec is None:
            fields[field] = None
        elif isinstance(spec, str):
            fields[field] = tensors[spec] if spec in tensors else derived[spec].compute()
        elif any(v in derived for v in spec.values()):
            fields[field] = _LazyTensors({k: tensors[v] if v in tensors else derived[v] for k, v in spec.items()})
        else:
            fields[field] = {k: tensors[v] for k, v in spec.items()}
    return kind(**fields)


def _encode_meta(meta: Any) -> Any:
    """ShapeProp's per-node metadata as JSON data; None if it holds something this cannot write."""
    if isinstance(meta, TensorMetadata):
        if meta.is_quantized:
            return None
        return {"tensor": {"shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch."),
                           "stride": list(meta.stride), "requires_grad": meta.requires_grad,
                           "memory_format": str(meta.memory_format).removeprefix("torch.") if meta.memory_format else None}}
    if isinstance(meta, (tuple, list)):
        items = [_encode_meta(m) for m in meta]
        return None if None in items else {"tuple" if isinstance(meta, tuple) else "list": items}
    if isinstance(meta, dict) and all(isinstance(k, str) for k in meta):
        items = {k: _encode_meta(v) for k, v in meta.items()}
        return None if None in items.values() else {"dict": items}
    if meta is None or isinstance(meta, (bool, int, float, str)):
        return {"value": meta}
    return None


def _decode_meta(data: dict[str, Any]) -> Any:
    (kind, value), = data.items()
    if kind == "tensor":
        fmt = value["memory_format"]
        return TensorMetadata(torch.Size(value["shape"]), getattr(torch, value["dtype"]), value["requires_grad"],
                              tuple(value["stride"]), getattr(torch, fmt) if fmt else None, False, {})
    if kind == "tuple":
        return tuple(_decode_meta(v) for v in value)
    if kind == "list":
        return [_decode_meta(v) for v in value]
    if kind == "dict":
        return {k: _decode_meta(v) for k, v in value.items()}
    return value


__all__ = ["CacheWarning", "ConversionCache", "ENV_VAR", "Fingerprint", "about", "cache_dir", "default_dir",
           "describe_conversion", "max_bytes", "weights_digest"]
