"""End-to-end throughput of a deployed model: host dispatch or trace replay, PCIe transfers overlapped
with two command queues, and data parallel over the chips of an n150, n300 or T3K.

The device-only estimate (``ttswap.tuning.estimate``) prices every device op of one forward pass. This
module puts that forward in a deployment:

* **plain** (``converted(x)``): the host dispatches every op (``host_dispatch_s`` each) while the
  device runs them (each op and a gap after it, as in a trace at best), so a frame takes the longer of
  the two, plus the input upload and the output download over PCIe, one after another.
* **trace + 2CQ** (``converted.pipeline()``): the device replays a captured trace; between two ops of
  a trace it still spends ``trace_op_gap_s`` (fetching and launching the next program). The next
  input's upload runs on the second queue, overlapped; the outputs are read on the first, after the
  forward. The host's per-frame work (``host_frame_s`` plus converting the input, at
  ``host_bytes_per_s``) overlaps the device's. A frame takes the longest of device, host and upload.
* **data parallel** over ``chips`` chips, one image per chip: each chip runs the same forward; the host
  prepares and reads ``chips`` images per step, and every transfer goes through the one PCIe link of
  each board's first chip: the second chip of an n300 is reached over ethernet behind it
  (``remote_transfer_factor``), and waiting for it to finish costs a round trip (``remote_sync_s``).

Published end-to-end figures were measured two ways, priced by ``protocol``: tt-metal's YOLOv4 test
(``tt_cnn`` pipeline) converts its inputs to ttnn host tensors before the clock starts and reads every
frame's output before queueing the next (``"serial"``); its VoVNet runner converts each input from
torch and queues frames without reading them back (``"no_readback"``). ttswap's pipeline overlaps the
next upload and reads outputs back (``"pipeline"``). The constants marked fitted are fitted on those
published figures by ``benchmarks/e2e_fps.py``; docs/cost_model.md has the end-to-end section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ttswap.tuning.hardware import N150, WormholeN150
from ttswap.tuning.pricing import OpCost

if TYPE_CHECKING:
    from ttswap.converter import ConvertedModel
    from ttswap.tuning.report import CostReport

MODES = ("plain", "trace+2CQ")
PROTOCOLS = ("pipeline", "serial", "no_readback")


@dataclass(frozen=True)
class Board:
    """A Wormhole board: its chips and each chip's worker grid (dispatch on ethernet cores, as tt-metal
    runs n300 and T3K: 8x8; ttnn's mock mode runs them with worker dispatch, 8x7)."""

    name: str
    chips: int
    pcie_links: int  # chips with their own PCIe link: one per board
    grid: tuple[int, int] = (8, 8)


BOARDS = {"n150": Board("n150", 1, 1), "n300": Board("n300", 2, 1), "t3k": Board("t3k", 8, 4)}


# The device pricing end-to-end figures are calibrated with (benchmarks/e2e_fps.py): N150's, with the op
# launch and matrix-engine efficiency fitted to the published end-to-end and device-only points, which
# tt-metal measured with trace (N150's own two were fitted to them read as untraced).
E2E_DEVICE = dataclasses.replace(N150, op_launch_s=4e-6, matmul_efficiency=0.15)


@dataclass(frozen=True)
class Deployment:
    """Host-side and link constants of an end-to-end deployment (see the module docstring)."""

    device: WormholeN150 = E2E_DEVICE  # device-op pricing
    trace_op_gap_s: float = 6e-6  # fitted: device time between two ops (replayed from a trace, or dispatched)
    host_frame_s: float = 0.3e-3  # assumed: host time per frame (Python, enqueue, events)
    host_bytes_per_s: float = 2e9  # assumed: host conversion of a torch input into a ttnn host tensor
    pcie_bytes_per_s: float = 10e9  # assumed: host <-> device DMA, each direction
    # fitted: a chip reached over ethernet (an n300's second chip): its transfers cost this much more than
    # a local chip's (fitted: nothing; they overlap), and a host wait for its completion this long
    remote_transfer_factor: float = 0.0
    remote_sync_s: float = 0.5e-3

    def replace(self, **changes) -> "Deployment":
        return dataclasses.replace(self, **changes)


DEPLOYMENT = Deployment()


@dataclass(frozen=True)
class Profile:
    """What the end-to-end model needs of one forward pass on one chip (batch per chip)."""

    kernel_s: float  # sum of device op times
    ops: int  # device ops
    input_bytes: int  # uploaded per frame (one chip's share)
    output_bytes: int  # downloaded per frame

    @classmethod
    def of(cls, report: "CostReport", input_bytes: int, output_bytes: int, extra: Sequence[OpCost] = ()) -> "Profile":
        """From a device-only cost report, plus device ops the report does not see (``extra``)."""
        return cls(report.device_seconds + sum(o.seconds for o in extra), report.device_ops + len(extra),
                   input_bytes, output_bytes)


def transfer_bytes(converted: "ConvertedModel") -> tuple[int, int]:
    """Bytes a converted model uploads and downloads per forward: bf16 on the wire."""
    from ttswap.modules import Download

    n, c, h, w = converted.input_shape
    outputs = [m.shape for m in converted.graph_module.modules() if isinstance(m, Download)]
    out = sum(2 * _numel(s) for s in outputs if s is not None)
    return 2 * n * c * h * w, out


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for v in shape:
        total *= v
    return total


def frame_seconds(profile: Profile, board: Board = BOARDS["n150"], mode: str = "trace+2CQ",
                  deployment: Deployment = DEPLOYMENT, protocol: str = "pipeline") -> float:
    """Seconds per step, one frame per chip of ``board``; FPS is ``board.chips`` over it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    d = deployment
    remote = board.chips // board.pcie_links - 1  # chips behind each board's PCIe chip
    # one step's transfers through each board's PCIe link: the first chip's share, then the others'
    link = 1 + remote * (1 + d.remote_transfer_factor)
    upload = profile.input_bytes * link / d.pcie_bytes_per_s
    download = profile.output_bytes * link / d.pcie_bytes_per_s
    # the host's own work per step; tt-metal's YOLOv4 test converts its inputs before it starts the clock
    convert = 0.0 if protocol == "serial" else profile.input_bytes / d.host_bytes_per_s
    host = board.chips * (d.host_frame_s + convert)
    sync = remote * d.remote_sync_s  # the host waiting for a frame's end on every chip
    # the device's own time: its ops, and the gap between two of them (at least as long without a trace)
    device = profile.kernel_s + profile.ops * d.trace_op_gap_s
    if mode == "plain":
        dispatch = profile.ops * d.device.host_dispatch_s
        return host + max(device, dispatch) + upload + download + sync
    if protocol == "serial":
        return host + upload + device + download + sync
    if protocol == "no_readback":
        return max(device, host + upload)
    return max(device + download, host + sync, upload)


def fps(profile: Profile, board: Board = BOARDS["n150"], mode: str = "trace+2CQ", deployment: Deployment = DEPLOYMENT,
        protocol: str = "pipeline") -> float:
    return board.chips / frame_seconds(profile, board, mode, deployment, protocol)


__all__ = ["BOARDS", "DEPLOYMENT", "E2E_DEVICE", "MODES", "PROTOCOLS", "Board", "Deployment", "Profile", "fps", "frame_seconds",
           "transfer_bytes"]
