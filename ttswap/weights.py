"""Reading and writing model weights: PyTorch state dicts, safetensors, and Darknet ``.cfg`` + ``.weights``.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: a file that needs full unpickling
is refused, because unpickling can run arbitrary code.

Darknet mapping. A ``.weights`` file is a header followed by every ``[convolutional]`` section's
parameters, in cfg order. pytorch-YOLOv4 numbers its convs in that same order (its source comments
carry the cfg's ``R -4``, ``R -1 -16`` route lines), and ``ttswap.models.yolov4`` registers them in
it, so the n-th cfg conv is the n-th ``ConvBnAct``. The route layers only make the *data flow*
non-sequential (e.g. ``head.conv3`` reads ``neck``'s stride-8 output, not ``head.conv2``'s); every
mapped pair is still checked for filters, input channels (tracked through route, shortcut, maxpool
and upsample layers), kernel, stride, padding, BatchNorm and activation before anything is loaded.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ttswap.models.yolov4 import YOLOv4, conv_layers

DEFAULT_RENAMES: Mapping[str, str] = {"neek.": "neck."}  # pytorch-YOLOv4's spelling of the neck
YOLOV4_CFG = Path(__file__).parent / "data" / "yolov4.cfg"
_WRAPPER_KEYS = ("state_dict", "model")


class StateDictMismatchError(RuntimeError):
    """A state dict does not fit a model: names or shapes disagree. Nothing was loaded."""


class DarknetFormatError(ValueError):
    """A Darknet cfg or weights file is malformed, or does not fit the model."""


# -- PyTorch / safetensors ---------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a flat ``{name: tensor}`` dict on the CPU.

    The format is told by the file's first bytes, not its suffix (a zip checkpoint, torch's legacy
    pickle format, or safetensors); anything else is refused as such. ``{"state_dict": ...}`` and
    ``{"model": ...}`` wrappers are unwrapped, and a ``module.`` prefix that every key carries
    (DataParallel) is stripped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: unknown weights format {suffix!r}; expected .pth, .pt or .safetensors")
    kind = checkpoint_kind(path)
    if kind is None:
        with open(path, "rb") as f:
            head = f.read(8)
        raise ValueError(
            f"{path} is neither a zip checkpoint (torch.save), a legacy pickle checkpoint (torch.save before "
            f"PyTorch 1.6) nor safetensors ({'it is empty' if not head else f'it starts with {head!r}'}); "
            "is it a weights file?"
        )
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{path} is a damaged safetensors file: {err}") from err
    else:
        obj = _torch_load(path, kind)

    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors, so this is no state dict: {not_tensors[:8]}")

    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# How torch's legacy (pre-zip) checkpoints start: the pickled magic number (protocol 2), without STOP.
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record


def checkpoint_kind(path: str | Path) -> str | None:
    """``"zip"``, ``"legacy"`` (torch's pickle format) or ``"safetensors"``, from the file's first
    bytes; None for anything else."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head == _LEGACY_MAGIC:
        return "legacy"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    return None


def _torch_load(path: Path, kind: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if culprit is None:  # no class it refused: the pickle itself is broken
            raise ValueError(f"{path} is a damaged {kind} checkpoint: torch cannot read it") from err
        raise ValueError(
            f"{path} stores Python objects beyond tensors and containers ({culprit.group(1)}), so it can only "
            "be read by full unpickling, which can run arbitrary code and which ttswap refuses. Re-save it as a "
            "plain state dict, e.g. torch.save(model.state_dict(), path), or as .safetensors."
        ) from err
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError) as err:  # truncated or corrupt
        raise ValueError(f"{path} is a damaged {kind} checkpoint: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'}") from err


def _rename(key: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], renames: Mapping[str, str] = DEFAULT_RENAMES
) -> None:
    """Load ``state_dict`` into ``model`` by name, strictly: every key present, none extra, shapes equal.

    ``renames`` maps old key prefixes to the model's. On any mismatch one ``StateDictMismatchError``
    lists all of them and the model is left untouched.
    """
    state = {_rename(k, renames): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"state dict does not fit {type(model).__name__}; nothing was loaded"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in items)
        raise StateDictMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)


# -- Darknet -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DarknetConv:
    """One ``[convolutional]`` section, with its input channels worked out from the graph."""

    layer: int  # index among all cfg layers, as Darknet counts them ([net] excluded)
    in_channels: int
    filters: int
    size: int
    stride: int
    padding: int
    batch_normalize: bool
    activation: str


def parse_darknet_cfg(text: str) -> list[dict[str, str]]:
    """Split a Darknet cfg into sections: ``[{"type": "convolutional", "filters": "32", ...}, ...]``."""
    sections: list[dict[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise DarknetFormatError(f"cfg line {lineno}: unterminated section header {raw!r}")
            sections.append({"type": line[1:-1].strip()})
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
        else:
            raise DarknetFormatError(f"cfg line {lineno}: expected [section] or key=value, got {raw!r}")
    return sections


def darknet_convs(cfg_text: str) -> list[DarknetConv]:
    """The cfg's convolutions in file order, each with its input channel count."""
    sections = parse_darknet_cfg(cfg_text)
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise DarknetFormatError("cfg must start with a [net] section")
    channels = int(sections[0].get("channels", 3))
    outputs: list[int] = []  # output channels of every layer so far
    convs: list[DarknetConv] = []
    for index, section in enumerate(sections[1:]):
        kind = section["type"]
        prev = outputs[-1] if outputs else channels
        if kind == "convolutional":
            if int(section.get("groups", 1)) != 1:
                raise DarknetFormatError(f"layer {index}: grouped convolutions are not supported")
            size = int(section.get("size", 1))
            pad = int(section.get("padding", 0)) if not int(section.get("pad", 0)) else size // 2
            conv = DarknetConv(
                layer=index,
                in_channels=prev,
                filters=int(section["filters"]),
                size=size,
                stride=int(section.get("stride", 1)),
                padding=pad,
                batch_normalize=bool(int(section.get("batch_normalize", 0))),
                activation=section.get("activation", "logistic"),
            )
            convs.append(conv)
            outputs.append(conv.filters)
        elif kind == "route":
            sources = [int(s) for s in section["layers"].split(",")]
            sources = [index + s if s < 0 else s for s in sources]
            if any(not 0 <= s < index for s in sources):
                raise DarknetFormatError(f"layer {index}: route to {section['layers']} is out of range")
            outputs.append(sum(outputs[s] for s in sources) // int(section.get("groups", 1)))
        elif kind in ("shortcut", "maxpool", "upsample", "yolo"):
            outputs.append(prev)
        else:
            raise DarknetFormatError(f"layer {index}: unsupported Darknet layer type [{kind}]")
    return convs


def _has_batch_norm(module: nn.Module) -> bool:
    return len(module.conv) > 1 and isinstance(module.conv[1], nn.BatchNorm2d)


def _check_conv_fits(name: str, module: nn.Module, dk: DarknetConv) -> None:
    conv: nn.Conv2d = module.conv[0]
    ours = (
        conv.out_channels,
        conv.in_channels,
        conv.kernel_size[0],
        conv.stride[0],
        conv.padding[0],
        _has_batch_norm(module),
        module.activation,
    )
    theirs = (dk.filters, dk.in_channels, dk.size, dk.stride, dk.padding, dk.batch_normalize, dk.activation)
    if ours != theirs:
        fields = ("filters", "in_channels", "size", "stride", "padding", "batch_normalize", "activation")
        diffs = ", ".join(f"{f}: cfg {t} vs model {o}" for f, o, t in zip(fields, ours, theirs) if o != t)
        raise DarknetFormatError(f"cfg layer {dk.layer} does not fit model conv {name!r}: {diffs}")


def _paired_convs(model: nn.Module, cfg_text: str) -> list[tuple[str, nn.Module, DarknetConv]]:
    ours = conv_layers(model)
    theirs = darknet_convs(cfg_text)
    if len(ours) != len(theirs):
        raise DarknetFormatError(f"cfg has {len(theirs)} convolutions, model {type(model).__name__} has {len(ours)}")
    for (name, module), dk in zip(ours, theirs):
        _check_conv_fits(name, module, dk)
    return [(name, module, dk) for (name, module), dk in zip(ours, theirs)]


def _darknet_tensor_order(name: str, module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict keys of one conv in the order Darknet stores them."""
    conv = module.conv[0]
    if _has_batch_norm(module):
        bn = f"{name}.conv.1"
        per_channel = (conv.out_channels,)
        keys = [f"{bn}.bias", f"{bn}.weight", f"{bn}.running_mean", f"{bn}.running_var"]
        return [(k, per_channel) for k in keys] + [(f"{name}.conv.0.weight", tuple(conv.weight.shape))]
    return [(f"{name}.conv.0.bias", (conv.out_channels,)), (f"{name}.conv.0.weight", tuple(conv.weight.shape))]


def _read_header(data: bytes, path: Path) -> int:
    """Parse the header; return its length in bytes."""
    if len(data) < 16:
        raise DarknetFormatError(f"{path}: {len(data)} bytes is too short for a Darknet weights header")
    major, minor, _revision = np.frombuffer(data, dtype="<i4", count=3)
    # `seen` (images trained on) grew from int32 to int64 in format 0.2
    return 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16


def load_darknet(model: nn.Module, cfg_path: str | Path | None, weights_path: str | Path) -> None:
    """Load Darknet ``.weights`` into ``model``, mapping the cfg's convolutions onto it in order.

    ``cfg_path`` None means the bundled ``yolov4.cfg`` (80 COCO classes). Every conv is checked against
    the cfg and the file must be consumed exactly; on any error the model is untouched.
    """
    weights_path = Path(weights_path)
    cfg_text = Path(cfg_path or YOLOV4_CFG).read_text()
    pairs = _paired_convs(model, cfg_text)
    data = weights_path.read_bytes()
    offset = _read_header(data, weights_path)
    values = np.frombuffer(data, dtype="<f4", offset=offset, count=(len(data) - offset) // 4)
    if (len(data) - offset) % 4:
        raise DarknetFormatError(f"{weights_path}: body of {len(data) - offset} bytes is not whole float32s")

    layout = [(key, shape, dk) for name, module, dk in pairs for key, shape in _darknet_tensor_order(name, module)]
    ends = np.cumsum([int(np.prod(shape)) for _, shape, _ in layout])
    if values.size < ends[-1]:
        key, _, dk = layout[int(np.searchsorted(ends, values.size, side="right"))]
        raise DarknetFormatError(
            f"{weights_path} ends inside cfg layer {dk.layer} ({key}): the cfg needs {ends[-1]} floats, the file "
            f"has {values.size}; is it the weights file for this cfg?"
        )
    if values.size > ends[-1]:
        raise DarknetFormatError(
            f"{weights_path} has {values.size - ends[-1]} floats left after the last convolution; "
            "is it the weights file for this cfg?"
        )

    state = dict(model.state_dict())
    for (key, shape, _), end in zip(layout, ends):
        start = end - int(np.prod(shape))
        state[key] = torch.from_numpy(values[start:end].copy()).reshape(shape)
    load_state_dict_strict(model, state, renames={})


def save_darknet(model: nn.Module, weights_path: str | Path, cfg_path: str | Path | None = None) -> None:
    """Write ``model`` as a Darknet ``.weights`` file (format 0.2, ``seen`` = 0) for the given cfg."""
    pairs = _paired_convs(model, Path(cfg_path or YOLOV4_CFG).read_text())
    state = model.state_dict()
    with open(weights_path, "wb") as f:
        f.write(np.array([0, 2, 5], dtype="<i4").tobytes())
        f.write(np.array([0], dtype="<i8").tobytes())
        for name, module, _ in pairs:
            for key, _ in _darknet_tensor_order(name, module):
                f.write(state[key].detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())


def _darknet_num_classes(cfg_text: str) -> int:
    classes = {int(s["classes"]) for s in parse_darknet_cfg(cfg_text) if s["type"] == "yolo"}
    if len(classes) != 1:
        raise DarknetFormatError(f"cfg [yolo] sections disagree on or lack `classes`: {sorted(classes)}")
    return classes.pop()


def load_yolov4(path: str | Path, cfg: str | Path | None = None) -> YOLOv4:
    """Build a ``YOLOv4`` from a checkpoint, in eval mode.

    ``.weights`` is read as Darknet with ``cfg`` (default: the bundled 80-class ``yolov4.cfg``);
    ``.pth``/``.pt``/``.safetensors`` as a state dict, the class count taken from the head's shape.
    """
    path = Path(path)
    if path.suffix.lower() == ".weights":
        cfg_path = Path(cfg or YOLOV4_CFG)
        model = YOLOv4(num_classes=_darknet_num_classes(cfg_path.read_text()))
        load_darknet(model, cfg_path, path)
        return model.eval()
    if cfg is not None:
        raise ValueError(f"a cfg is only meaningful for Darknet .weights files, not {path.name}")
    state = read_state_dict(path)
    head = state.get("head.conv2.conv.0.weight")
    if head is None or head.shape[0] % 3 or head.shape[0] // 3 < 6:
        found = None if head is None else tuple(head.shape)
        raise StateDictMismatchError(f"{path}: no YOLOv4 head (head.conv2.conv.0.weight is {found})")
    model = YOLOv4(num_classes=head.shape[0] // 3 - 5)
    load_state_dict_strict(model, state)
    return model.eval()
