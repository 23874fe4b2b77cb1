"""Do the emulated backend's L1 estimate and ttnn agree on which conv configurations fit?

Every conv of ese_vovnet19b_dw at 224x224 and of YOLOv4 at 320x320 (both halves of a separable conv
included) runs alone, its input placed as the converted model places it, under the recipe's config
and under variants: shard HEIGHT / BLOCK / WIDTH x act_block_h default / 128 / 1024. Each runs in
lockstep (``ttswap.crosscheck.LockstepBackend``) on the emulated backend, which refuses a conv whose
L1 estimate exceeds the per-core budget, and on ttnn (mock mode without a device), which refuses one
whose buffers and circular buffers do not fit. A configuration ttnn refuses for another reason (op
validation) is counted apart and left out of the agreement. Where both run, the output placements
(shard layout, grid, shard shape) are compared too.

    python benchmarks/l1_agreement.py [--models vovnet yolov4] [--show 20]
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from dataclasses import dataclass

import timm
import torch

import ttswap
from ttswap.backends.base import L1BudgetError
from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.ttnn_backend import TtnnBackend
from ttswap.config import Conv2dSpec, DType, Layout, OpConfig, ShardLayout
from ttswap.crosscheck import CrossCheckError, LockstepBackend, OpCheck
from ttswap.layers import ConvLayer
from ttswap.models.yolov4 import YOLOv4

MODELS = {
    "vovnet": (lambda: timm.create_model("ese_vovnet19b_dw", pretrained=False), "ese_vovnet", (1, 3, 224, 224)),
    "yolov4": (YOLOv4, "yolov4", (1, 3, 320, 320)),
}
LAYOUTS = (ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH)
ACT_BLOCK_HEIGHTS = (None, 128, 1024)


@dataclass(frozen=True)
class ConvSite:
    """A conv as the converted model runs it: its geometry, config and input."""

    layer: str
    spec: Conv2dSpec
    cfg: OpConfig
    input_nhwc: tuple[int, int, int, int]
    input_dtype: DType
    input_layout: Layout
    input_shard: ShardLayout


@dataclass
class Trial:
    site: ConvSite
    cfg: OpConfig
    estimate_fits: bool
    ttnn_verdict: str  # "fits", "L1" (an L1 or circular-buffer overflow) or "invalid"
    same_placement: bool | None  # None unless both ran
    detail: str = ""


def conv_sites(model: torch.nn.Module, recipe: str, shape: tuple[int, ...]) -> list[ConvSite]:
    """Convert for the emulated backend and record every conv's input on one forward pass."""
    converted = ttswap.convert(model, recipe, input_shape=shape, backend="emulated")
    sites: list[ConvSite] = []

    def record(module: ConvLayer, args: tuple) -> None:
        x = args[0]
        sites.append(ConvSite(module.layer, module.spec, module.cfg, (x.n, x.h, x.w, x.c), x.dtype, x.layout,
                              x.memory.layout))

    hooks = [m.register_forward_pre_hook(record) for m in converted.modules() if isinstance(m, ConvLayer)]
    converted(torch.zeros(shape))
    for hook in hooks:
        hook.remove()
    return sites


def variants(cfg: OpConfig) -> list[OpConfig]:
    found = [cfg] + [cfg.replace(shard=s, act_block_h=a) for s in LAYOUTS for a in ACT_BLOCK_HEIGHTS]
    return list(dict.fromkeys(found))


def run_trial(lock: LockstepBackend, site: ConvSite, weights, cfg: OpConfig) -> Trial:
    n, h, w, c = site.input_nhwc
    x = lock.upload(torch.zeros(n, c, h, w), OpConfig(act_dtype=site.input_dtype), site.layer)
    if site.input_layout is Layout.TILE and x.layout is not Layout.TILE:
        x = lock.to_layout(x, Layout.TILE, site.layer)
    if site.input_shard is not ShardLayout.INTERLEAVED:
        x = lock.to_memory(x, site.input_shard, site.layer)
    try:
        lock.conv2d(x, weights, site.spec, cfg, site.layer)
        check = lock.checks[-1]
    except CrossCheckError as error:
        check = error.check
    finally:
        lock.checks.clear()
        # every cached program keeps its conv's index tensors in the 32 KiB l1_small region, which
        # hundreds of configurations of one layer would exhaust; a model never caches that many
        lock.checked.device.clear_program_cache()
    return _verdict(site, cfg, check)


def _verdict(site: ConvSite, cfg: OpConfig, check: OpCheck) -> Trial:
    ref, ttnn_error = check.reference_error, check.checked_error
    if ref is not None and not isinstance(ref, L1BudgetError):
        raise RuntimeError(f"{site.layer}: the emulated backend failed other than on L1: {ref}") from ref
    if ttnn_error is None:
        verdict = "fits"
    elif isinstance(ttnn_error, L1BudgetError):
        verdict = "L1"
    else:
        verdict = "invalid"
    both_ran = ref is None and ttnn_error is None
    detail = "" if ttnn_error is None else str(ttnn_error).split("\n")[0][:300]
    return Trial(site, cfg, ref is None, verdict, check.reference == check.checked if both_ran else None, detail)


def describe(cfg: OpConfig) -> str:
    return f"{cfg.shard.value}/abh={cfg.act_block_h or 'default'}"


def summarize(name: str, trials: list[Trial], show: int) -> None:
    valid = [t for t in trials if t.ttnn_verdict != "invalid"]
    both_fit = sum(t.estimate_fits and t.ttnn_verdict == "fits" for t in valid)
    both_reject = sum(not t.estimate_fits and t.ttnn_verdict == "L1" for t in valid)
    optimistic = [t for t in valid if t.estimate_fits and t.ttnn_verdict == "L1"]
    pessimistic = [t for t in valid if not t.estimate_fits and t.ttnn_verdict == "fits"]
    ran = [t for t in valid if t.same_placement is not None]
    agreement = (both_fit + both_reject) / max(len(valid), 1)
    print(f"\n{name}: {len({t.site.layer for t in trials})} convs, {len(trials)} configurations")
    print(f"  {'both fit':<34}{both_fit:>6}")
    print(f"  {'both reject':<34}{both_reject:>6}")
    print(f"  {'estimate fits, ttnn rejects':<34}{len(optimistic):>6}   (the estimate is too low)")
    print(f"  {'estimate rejects, ttnn fits':<34}{len(pessimistic):>6}   (the estimate is too high)")
    print(f"  {'ttnn rejects as invalid':<34}{len(trials) - len(valid):>6}   (left out)")
    print(f"  fit agreement {agreement:.1%}; same output placement where both ran: "
          f"{sum(t.same_placement for t in ran)}/{len(ran)}")
    for label, wrong in (("estimate too low", optimistic), ("estimate too high", pessimistic),
                         ("placement differs", [t for t in ran if not t.same_placement])):
        for t in wrong[:show]:
            print(f"    {label}: {t.site.layer} {describe(t.cfg)} {t.detail}")
    invalid = [t.detail.split(": ", 2)[-1] for t in trials if t.ttnn_verdict == "invalid"]
    for reason, count in Counter(re.sub(r"\d+", "N", d)[:110] for d in invalid).most_common(show):
        print(f"    invalid x{count}: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--show", type=int, default=10, help="disagreements to list per kind")
    args = parser.parse_args()
    torch.manual_seed(0)
    lock = LockstepBackend(EmulatedBackend(), TtnnBackend(), stop_at_first=False)
    print(f"ttnn {'in mock mode' if lock.checked.mock else 'on a device'}; variants per conv: the recipe's "
          f"config, shard {'/'.join(s.value for s in LAYOUTS)} x act_block_h "
          f"{'/'.join(str(a or 'default') for a in ACT_BLOCK_HEIGHTS)}")
    everything: list[Trial] = []
    for name in args.models:
        make, recipe, shape = MODELS[name]
        start = time.perf_counter()
        trials = []
        for site in conv_sites(make().eval(), recipe, shape):
            spec = site.spec
            weight = torch.randn(spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)
            weights = lock.prepare_conv(weight, None, spec, site.cfg, site.layer)
            trials += [run_trial(lock, site, weights, cfg) for cfg in variants(site.cfg)]
        summarize(f"{name} at {shape[2]}x{shape[3]} ({time.perf_counter() - start:.0f} s)", trials, args.show)
        everything += trials
    if len(args.models) > 1:
        summarize("all models", everything, 0)
    lock.close()


if __name__ == "__main__":
    main()
