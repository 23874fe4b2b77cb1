"""Per-op error of emulated 3x3 convs under ttnn's K-block loop, with and without packer_l1_acc.

Relative RMS error against float64 for HEIGHT-sharded 3x3 convs with a bias, next to the error of a
single rounding of the exact result (what the emulator modelled before partial sums were rounded
between K-blocks). Not a test: prints a table (docs/numerics.md, "K-blocks").

    .venv/bin/python benchmarks/conv_partials.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.numerics import quantize
from ttswap.config import Conv2dSpec, DType, Fidelity, OpConfig, ShardLayout

CASES = [(64, 28), (256, 14)]  # channels, input size
CONFIGS = [(DType.BF16, Fidelity.HIFI4, True), (DType.BF16, Fidelity.LOFI, False),
           (DType.BFP8_B, Fidelity.HIFI4, True), (DType.BFP8_B, Fidelity.LOFI, False)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'conv':16} {'dtype':7} {'math':12} {'one rounding':>12} {'l1_acc off':>11} {'l1_acc on':>10}")
    for channels, hw in CASES:
        spec = Conv2dSpec(channels, channels, (3, 3), padding=(1, 1))
        gen = torch.Generator().manual_seed(0)
        x = torch.relu(torch.randn(1, channels, hw, hw, generator=gen))
        w = torch.randn(channels, channels, 3, 3, generator=gen) * math.sqrt(2 / (9 * channels))
        b = torch.randn(channels, generator=gen) * 0.5
        exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        for dtype, fidelity, fp32_acc in CONFIGS:
            errors = []
            for l1_acc in (False, True):
                cfg = OpConfig(shard=ShardLayout.HEIGHT, act_dtype=dtype, weight_dtype=dtype, fidelity=fidelity,
                               fp32_acc=fp32_acc, packer_l1_acc=l1_acc)
                backend = EmulatedBackend(check_l1=False)
                t = backend.upload(x, cfg)
                y = backend.conv2d(t, backend.prepare_conv(w, b, spec, cfg, "conv"), spec, cfg, "conv")
                errors.append(rel_err(backend.download(y), exact))
            once = rel_err(quantize(exact.float().permute(0, 2, 3, 1), dtype).permute(0, 3, 1, 2), exact)
            name = f"{channels}->{channels}@{hw}"
            math_name = f"{fidelity.value}{'+fp32acc' if fp32_acc else ''}"
            print(f"{name:16} {dtype.value:7} {math_name:12} {once:12.2e} {errors[0]:11.2e} {errors[1]:10.2e}")


if __name__ == "__main__":
    main()
