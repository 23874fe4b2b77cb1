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

Location: ``convert(cache=...)`` (a directory; ``True``, the default, for the default directory;
``False`` disables the cache), else ``$TTSWAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttswap/weights``
(``~/.cache/ttswap/weights``). After each write the least recently used files beyond
``MAX_CACHE_BYTES`` are deleted.
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
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ttswap.backends.base import Backend
from ttswap.recipe import Recipe
from ttswap.trace import propagate_shapes

log = logging.getLogger("ttswap")

FORMAT = 1
ENV_VAR = "TTSWAP_CACHE_DIR"
MAX_CACHE_BYTES = 4 * 2**30

T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache file could not be used (and is being rebuilt) or written."""


class _Unusable(Exception):
    pass


def default_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ttswap" / "weights"


def cache_dir(cache: "bool | str | Path") -> Path | None:
    """Where ``convert(cache=...)`` keeps its files; None when caching is off."""
    if cache is False:
        return None
    if cache is True:
        return default_dir()
    if isinstance(cache, (str, Path)):
        return Path(cache).expanduser()
    raise TypeError(f"cache must be True, False or a directory, got {cache!r}")


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
    import ttswap

    versions = {"backend": backend, "ttswap": ttswap.__version__, "torch": torch.__version__}
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
    ``save`` writes back. A disabled cache (``path`` None) computes everything and stores nothing."""

    def __init__(self, path: Path | None = None, key: str = ""):
        self.path, self.key = path, key
        self.hit = False  # a usable file was found
        self._entries: dict[str, Any] = {"shapes": None, "values": {}, "prepared": {}}
        self._tensors: dict[str, torch.Tensor] = {}
        self._dirty = False

    @classmethod
    def open(cls, directory: Path | None, fingerprint: Fingerprint) -> "ConversionCache":
        if directory is None:
            return cls()
        cache = cls(directory / f"{fingerprint.key}.safetensors", fingerprint.key)
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
            return _rebuild(entry, self._tensors)
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
        """Write the file if this conversion computed anything new. A failed write only warns."""
        if self.path is None or not self._dirty:
            return
        from safetensors.torch import save_file

        stored, index, seen = {}, {}, set()
        for name, tensor in self._tensors.items():
            stored[name], index[name] = _to_file(tensor, seen)
        header = {"ttswap.format": str(FORMAT), "ttswap.key": self.key,
                  "ttswap.entries": json.dumps(self._entries), "ttswap.tensors": json.dumps(index)}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file(stored, str(tmp), metadata=header)
            os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"could not write the weight cache file {self.path}: {exc}", CacheWarning, stacklevel=3)
            return
        self._dirty = False
        log.info("weight cache: wrote %s (%.0f MB)", self.path, self.path.stat().st_size / 1e6)
        _evict(self.path.parent, keep=self.path)

    # -- reading -------------------------------------------------------------------------------------
    def _load(self) -> None:
        assert self.path is not None
        if not self.path.is_file():
            log.info("weight cache: miss, will write %s", self.path)
            return
        try:
            self._entries, self._tensors = _read(self.path, self.key)
        except Exception as exc:  # whatever is wrong with the file, it must not be used
            warnings.warn(f"weight cache file {self.path} is unusable ({exc}); rebuilding it", CacheWarning, stacklevel=4)
            self.path.unlink(missing_ok=True)
            return
        self.hit = True
        os.utime(self.path)  # recently used: evicted last
        log.info("weight cache: hit %s", self.path)


def _read(path: Path, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("ttswap.format") != str(FORMAT):
            raise _Unusable(f"format {header.get('ttswap.format')!r}, this ttswap reads format {FORMAT}")
        if header.get("ttswap.key") != key:
            raise _Unusable(f"it holds key {header.get('ttswap.key')!r}, not {key!r}")
        index = json.loads(header["ttswap.tensors"])
        if set(f.keys()) != set(index):
            raise _Unusable("its tensors differ from its index")
        tensors = {}
        for name, info in index.items():
            stored = f.get_tensor(name)
            if zlib.crc32(_raw_bytes(stored)) != info["crc"]:
                raise _Unusable(f"checksum mismatch in {name!r}")
            tensors[name] = _from_file(stored, info)
    return json.loads(header["ttswap.entries"]), tensors


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


def _rebuild(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    module, qualname = entry["class"].split(":")
    if module != "ttswap" and not module.startswith("ttswap."):
        raise _Unusable(f"entry class {entry['class']!r} is not ttswap's")
    kind = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    fields = {}
    for field, spec in entry["fields"].items():
        if spec is None or isinstance(spec, str):
            fields[field] = None if spec is None else tensors[spec]
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


def _evict(directory: Path, keep: Path) -> None:
    """Delete the least recently used cache files beyond ``MAX_CACHE_BYTES`` (never ``keep``)."""
    files = []
    for path in directory.glob("*.safetensors"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = 0
    for _, size, path in sorted(files, reverse=True):
        total += size
        if total > MAX_CACHE_BYTES and path != keep:
            path.unlink(missing_ok=True)
            log.info("weight cache: evicted %s", path)


__all__ = ["CacheWarning", "ConversionCache", "ENV_VAR", "Fingerprint", "MAX_CACHE_BYTES", "cache_dir",
           "default_dir", "weights_digest"]
