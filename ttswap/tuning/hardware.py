"""The device the cost model prices ops for: a Wormhole n150, as published figures and a few fitted
or assumed constants. Which constant is which, and where each published figure comes from, is in
docs/cost_model.md; ``benchmarks/cost_calibration.py`` prints the fit."""

from __future__ import annotations

from dataclasses import dataclass

from ttswap.backends.base import TILE
from ttswap.config import Fidelity


@dataclass(frozen=True)
class WormholeN150:
    """The device the model prices ops for. Published figures first, then fitted or assumed ones."""

    clock_hz: float = 1.0e9
    matmul_flops_per_cycle: int = 4096  # per core at LoFi: an 8x16 by 16x16 product per cycle
    dram_bytes_per_s: float = 288e9  # 12 GDDR6 banks
    # One NoC link moves a 32-byte flit per cycle; a core's reader or writer kernel drives one link.
    noc_bytes_per_cycle: float = 32.0
    # -- fitted to published n150 throughputs (benchmarks/cost_calibration.py) -------------------
    op_launch_s: float = 12e-6  # device-side fixed cost of one device op
    matmul_efficiency: float = 0.1  # achieved / peak matrix-engine rate inside a conv or matmul
    # -- assumed (order of magnitude from the kernel structure; not fitted) -----------------------
    host_dispatch_s: float = 15e-6  # host time to dispatch one op without trace (end to end only)
    tile_cycles: float = 64.0  # one tile through unpack -> math -> pack: eltwise, tilize, reduce
    noc_request_cycles: float = 20.0  # issuing one NoC read: small reads (a few sticks) are latency-bound
    act_block_cycles: float = 400.0  # per act block of a conv: pipeline restart between blocks
    fp32_acc_factor: float = 1.25  # fp32 Dst holds half the tiles: smaller sub-blocks, more unpacking
    pcie_bytes_per_s: float = 10e9  # host <-> device, effective
    transfer_latency_s: float = 50e-6  # per host <-> device transfer

    @property
    def tile_product_cycles(self) -> float:
        """Cycles of one 32x32 by 32x32 tile product at LoFi (16)."""
        return 2 * TILE**3 / self.matmul_flops_per_cycle

    def seconds(self, cycles: float) -> float:
        return cycles / self.clock_hz

    def noc_seconds(self, bytes_per_core: float) -> float:
        return bytes_per_core / (self.noc_bytes_per_cycle * self.clock_hz)


N150 = WormholeN150()

# Matrix-engine passes per multiply: HiFi2/3/4 take 2/3/4 passes over the operand bits LoFi reads once.
FIDELITY_PHASES = {Fidelity.LOFI: 1, Fidelity.HIFI2: 2, Fidelity.HIFI3: 3, Fidelity.HIFI4: 4}
# SFPU cycles per 32x32 tile, by activation: roughly 32 vector rows times the instructions each needs
# (ttnn's accurate variants; transcendental ones evaluate polynomials and exponentials). Assumed.
SFPU_TILE_CYCLES = {
    "relu": 64, "relu6": 64, "leaky_relu": 96, "hardsigmoid": 96, "hardswish": 128,
    "sigmoid": 512, "silu": 576, "gelu": 640, "mish": 1024,
}

__all__ = ["FIDELITY_PHASES", "N150", "SFPU_TILE_CYCLES", "WormholeN150"]
