"""Run one converted graph on two backends in lockstep and compare what every op reports.

``LockstepBackend`` is a backend whose tensors and prepared weights are pairs: each op the converted
model calls runs on the *reference* backend (the emulated one) and on the *checked* one (ttnn, on a
device or in mock mode), and the two results' metadata are compared on the spot: logical shape,
dtype, layout and memory placement (interleaved or sharded, buffer, core grid, core count, shard
shape). The first op where they part, or where either backend raises (an L1 or circular-buffer
overflow, an op validation error), stops the run with a ``CrossCheckError`` naming the layer and
the recipe rules that configured it.

One conversion serves both backends, so the recipe, the BatchNorm folding and the bfp8 guard are
decided once and both sides see exactly the same layers and configs::

    result = crosscheck(model, "yolov4", (1, 3, 320, 320))
    assert result.ok, result.summary()

Downloads hand back the reference's values, so torch fallbacks and the model's output compute on
real numbers even when the checked side is mock mode (which reads back zeros); both sides' downloads
are kept in ``CrossCheckResult.downloads`` for a device run to compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ttswap.backends import get_backend
from ttswap.backends.base import Backend, DeviceTensor, MemorySpec
from ttswap.config import Activation, Conv2dSpec, DType, Layout, OpConfig, Pool2dSpec, ShardLayout
from ttswap.recipe import Recipe
from ttswap.report import ConversionReport


@dataclass(frozen=True)
class Pair:
    """What the two backends hold for one value: a DeviceTensor each, or prepared weights each."""

    reference: Any
    checked: Any


@dataclass(frozen=True)
class TensorMeta:
    """Everything a backend reports about a device tensor except its values."""

    shape: tuple[int, int, int, int]  # logical N, H, W, C
    dtype: DType
    layout: Layout
    memory: MemorySpec

    @classmethod
    def of(cls, t: DeviceTensor) -> "TensorMeta":
        return cls((t.n, t.h, t.w, t.c), t.dtype, t.layout, t.memory)

    def describe(self) -> str:
        m = self.memory
        where = f"{m.layout.value} {m.buffer}"
        if m.shard_shape is not None:
            where += f" grid {m.grid} x{m.num_cores} shard {list(m.shard_shape)}"
        return f"{list(self.shape)} {self.dtype.value} {self.layout.value} {where}"


@dataclass
class OpCheck:
    """One op as both backends ran it: the metadata each reported, or the error each raised."""

    index: int
    layer: str
    op: str
    reference: TensorMeta | None = None
    checked: TensorMeta | None = None
    reference_error: Exception | None = None
    checked_error: Exception | None = None
    rules: tuple[str, ...] = ()  # the recipe rules behind the layer, filled in by crosscheck()

    @property
    def agrees(self) -> bool:
        return self.reference_error is None and self.checked_error is None and self.reference == self.checked

    def describe(self) -> str:
        def side(meta: TensorMeta | None, error: Exception | None) -> str:
            return f"raised {type(error).__name__}: {error}" if error is not None else meta.describe()

        rules = ", ".join(self.rules) or "recipe defaults"
        return (f"op #{self.index} {self.op} of layer {self.layer!r} (configured by {rules}):\n"
                f"  reference: {side(self.reference, self.reference_error)}\n"
                f"  checked:   {side(self.checked, self.checked_error)}")


class CrossCheckError(RuntimeError):
    """The two backends disagree on an op, or one of them rejected it."""

    def __init__(self, check: OpCheck):
        super().__init__(check)
        self.check = check

    def __str__(self) -> str:  # rendered late: crosscheck() adds the recipe rules after the run
        return self.check.describe()


class LockstepBackend(Backend):
    """Runs every op on ``reference`` and ``checked`` and records both results (``self.checks``).

    Raises ``CrossCheckError`` at the first op where the results' metadata differ or either backend
    raises, unless ``stop_at_first=False``, in which case metadata mismatches are only recorded (an
    error still stops the run: there is no output to continue from).
    """

    def __init__(self, reference: Backend, checked: Backend, stop_at_first: bool = True):
        self.reference, self.checked = reference, checked
        self.name = f"{reference.name}+{checked.name}"
        self.stop_at_first = stop_at_first
        self.checks: list[OpCheck] = []
        # every download of the last run, by layer: (reference values, checked values: zeros in mock mode)
        self.downloads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- the lockstep machinery ------------------------------------------------------------------
    def _both(self, op: str, layer: str, *args: Any) -> DeviceTensor:
        check = OpCheck(len(self.checks), layer, op)
        self.checks.append(check)
        results = []
        for side in ("reference", "checked"):
            try:
                result = getattr(getattr(self, side), op)(*(_pick(a, side) for a in args))
            except Exception as error:  # noqa: BLE001 - recorded, then re-raised below with both sides
                setattr(check, f"{side}_error", _detached(error))
                results.append(None)
            else:
                setattr(check, side, TensorMeta.of(result))
                results.append(result)
        if check.reference_error is not None or check.checked_error is not None:
            raise CrossCheckError(check)
        if self.stop_at_first and not check.agrees:
            raise CrossCheckError(check)
        reference, checked = results
        return DeviceTensor(Pair(reference, checked), reference.n, reference.h, reference.w, reference.c,
                            reference.dtype, reference.layout, reference.memory)

    # -- transfers -------------------------------------------------------------------------------
    def upload(self, x: torch.Tensor, cfg: OpConfig, layer: str = "input") -> DeviceTensor:
        return self._both("upload", layer, x, cfg, layer)

    def download(self, t: DeviceTensor, layer: str = "output") -> torch.Tensor:
        reference = self.reference.download(t.payload.reference, layer)
        self.downloads[layer] = reference, self.checked.download(t.payload.checked, layer)
        return reference

    # -- weights ---------------------------------------------------------------------------------
    def prepare_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: Conv2dSpec, cfg: OpConfig,
                     layer: str) -> Pair:
        return Pair(self.reference.prepare_conv(weight, bias, spec, cfg, layer),
                    self.checked.prepare_conv(weight, bias, spec, cfg, layer))

    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, cfg: OpConfig, layer: str) -> Pair:
        return Pair(self.reference.prepare_linear(weight, bias, cfg, layer),
                    self.checked.prepare_linear(weight, bias, cfg, layer))

    # -- compute ---------------------------------------------------------------------------------
    def conv2d(self, x: DeviceTensor, weights: Pair, spec: Conv2dSpec, cfg: OpConfig, layer: str,
               activation: Activation | None = None) -> DeviceTensor:
        return self._both("conv2d", layer, x, weights, spec, cfg, layer, activation)

    def max_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("max_pool2d", layer, x, spec, cfg, layer)

    def avg_pool2d(self, x: DeviceTensor, spec: Pool2dSpec, cfg: OpConfig, layer: str, count_include_pad: bool = True,
                   divisor_override: int | None = None) -> DeviceTensor:
        return self._both("avg_pool2d", layer, x, spec, cfg, layer, count_include_pad, divisor_override)

    def upsample_nearest(self, x: DeviceTensor, scale: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("upsample_nearest", layer, x, scale, cfg, layer)

    def concat(self, xs: Sequence[DeviceTensor], cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("concat", layer, list(xs), cfg, layer)

    def add(self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str,
            activation: Activation | None = None) -> DeviceTensor:
        return self._both("add", layer, a, b, cfg, layer, activation)

    def multiply(self, a: DeviceTensor, b: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("multiply", layer, a, b, cfg, layer)

    def activation(self, x: DeviceTensor, act: Activation, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("activation", layer, x, act, cfg, layer)

    def mean_hw(self, x: DeviceTensor, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("mean_hw", layer, x, cfg, layer)

    def linear(self, x: DeviceTensor, weights: Pair, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("linear", layer, x, weights, cfg, layer)

    # -- memory and layout -----------------------------------------------------------------------
    def to_memory(self, x: DeviceTensor, layout: ShardLayout, layer: str) -> DeviceTensor:
        return self._both("to_memory", layer, x, layout, layer)

    def to_layout(self, x: DeviceTensor, layout: Layout, layer: str) -> DeviceTensor:
        return self._both("to_layout", layer, x, layout, layer)

    def close(self) -> None:
        self.reference.close()
        self.checked.close()

    # -- channel slices, four-sided conv padding, LayerNorm over channels ------------------------
    def slice_channels(self, x: DeviceTensor, start: int, stop: int, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("slice_channels", layer, x, start, stop, cfg, layer)

    def conv2d_padded(self, x: DeviceTensor, weights: Pair, spec: Conv2dSpec, padding: tuple[int, int, int, int],
                      cfg: OpConfig, layer: str, activation: Activation | None = None) -> DeviceTensor:
        return self._both("conv2d_padded", layer, x, weights, spec, padding, cfg, layer, activation)

    def prepare_layer_norm(self, weight: torch.Tensor | None, bias: torch.Tensor | None, cfg: OpConfig,
                           layer: str) -> Pair:
        return Pair(self.reference.prepare_layer_norm(weight, bias, cfg, layer),
                    self.checked.prepare_layer_norm(weight, bias, cfg, layer))

    def layer_norm(self, x: DeviceTensor, weights: Pair, eps: float, cfg: OpConfig, layer: str) -> DeviceTensor:
        return self._both("layer_norm", layer, x, weights, eps, cfg, layer)

    def global_response_norm(self, x: DeviceTensor, weights: Pair, eps: float, cfg: OpConfig,
                             layer: str) -> DeviceTensor:
        return self._both("global_response_norm", layer, x, weights, eps, cfg, layer)


def _detached(error: BaseException) -> BaseException:
    """``error`` and the errors it chains, without tracebacks: their frames would keep the failed
    op's device tensors, and their L1, alive for as long as the record is kept."""
    seen: BaseException | None = error
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return error


def _pick(value: Any, side: str) -> Any:
    """One backend's share of an op argument: its tensor, its weights, or the argument itself."""
    if isinstance(value, DeviceTensor):
        return getattr(value.payload, side)
    if isinstance(value, Pair):
        return getattr(value, side)
    if isinstance(value, list):
        return [_pick(v, side) for v in value]
    return value


def rules_for(report: ConversionReport, layer: str) -> tuple[str, ...]:
    """The recipe rules behind the report layer that ``layer`` (an op's layer argument) belongs to:
    the same layer, or the nearest enclosing one (a composite's sub-layer such as a depthwise conv)."""
    best: tuple[str, ...] = ()
    best_len = -1
    for record in report.records:
        name = record.layer
        if name is None:
            continue
        if (name == layer or layer.startswith(name + ".")) and len(name) > best_len:
            best, best_len = record.rules, len(name)
    return best


@dataclass
class CrossCheckResult:
    """What a lockstep run found: every op compared, and the error that stopped it, if any."""

    report: ConversionReport
    checks: list[OpCheck]
    error: CrossCheckError | None = None
    downloads: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.mismatches

    @property
    def mismatches(self) -> list[OpCheck]:
        return [c for c in self.checks if not c.agrees]

    def summary(self) -> str:
        head = (f"{self.report.model} at {list(self.report.input_shape)} with recipe {self.report.recipe!r}: "
                f"{len(self.checks)} ops compared, {len(self.mismatches)} disagree")
        if self.error is not None:
            head += ", run stopped by an error"
        return "\n".join([head, *(c.describe() for c in self.mismatches)])


def crosscheck(
    model: nn.Module,
    recipe: "str | Recipe",
    input_shape: Sequence[int],
    *,
    reference: "str | Backend" = "emulated",
    checked: "str | Backend" = "ttnn",
    inputs: torch.Tensor | None = None,
    stop_at_first: bool = False,
) -> CrossCheckResult:
    """Convert ``model`` once for both backends, run ``inputs`` (default: a seeded random image)
    through it, and compare every op. Conversion errors propagate; run errors end up in ``.error``."""
    from ttswap.converter import convert  # late: convert imports the patterns, which import much of ttswap

    backend = LockstepBackend(_backend(reference), _backend(checked), stop_at_first=stop_at_first)
    converted = convert(model, recipe, input_shape=tuple(input_shape), backend=backend)
    x = inputs if inputs is not None else torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    result = CrossCheckResult(converted.report, backend.checks)
    try:
        converted(x)
    except CrossCheckError as error:
        result.error = error
    for check in backend.checks:
        check.rules = rules_for(converted.report, check.layer)
    result.downloads = dict(backend.downloads)
    return result


def _backend(backend: "str | Backend") -> Backend:
    return get_backend(backend) if isinstance(backend, str) else backend
