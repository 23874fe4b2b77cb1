"""How much the weight cache saves on YOLOv4: conversion time without the cache, with an empty cache
(the first conversion, which also writes the file) and with a filled one (the conversions after it),
and the size of the cache file.

    python benchmarks/cache_speedup.py [--size 320] [--backend emulated] [--rounds 1] [--hits 3] [--profile]

Each round uses a fresh cache directory; a hit's time is the median of ``--hits`` conversions.
``--profile`` adds where the time goes in a conversion without the cache and in a cache hit
(cumulative seconds under cProfile, which slows both a little).
Timings on a shared machine vary run to run: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ttswap
from ttswap.models.yolov4 import YOLOv4

# (label, file suffix, function name) of the steps a conversion spends its time in
STEPS = [
    ("copy the model", "copy.py", "deepcopy"),
    ("symbolic trace", "_symbolic_trace.py", "trace"),
    ("fingerprint (sha256 of weights)", "cache.py", "of"),
    ("shape propagation (fp32 forward)", "trace.py", "propagate_shapes"),
    ("match patterns and build layers", "converter.py", "_match_all"),
    ("  BatchNorm folding", "layers.py", "fold_batchnorm"),
    ("  bfloat8_b guard", "layers.py", "bfp8_channel_error"),
    ("  prepare conv weights", "emulated.py", "prepare_conv"),
    ("read the cache file", "cache.py", "_read"),
    ("write the cache file", "cache.py", "_write"),
]


def convert(model: torch.nn.Module, size: int, backend: str, cache) -> float:
    start = time.perf_counter()
    ttswap.convert(model, "yolov4", input_shape=(1, 3, size, size), backend=backend, cache=cache)
    return time.perf_counter() - start


def profile(model: torch.nn.Module, size: int, backend: str, cache) -> dict[str, float]:
    profiler = cProfile.Profile()
    profiler.runcall(convert, model, size, backend, cache)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ncalls, total, cumulative, callers)
    seconds = {}
    for label, suffix, name in STEPS:
        # outermost calls only: a recursive function's cumulative time already includes its inner calls
        seconds[label] = max((v[3] for (file, _, fn), v in stats.items() if fn == name and file.endswith(suffix)),
                             default=0.0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--backend", default="emulated", choices=("emulated", "ttnn"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--hits", type=int, default=3, help="conversions from the filled cache per round")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = YOLOv4().eval()
    times: dict[str, list[float]] = {"no cache": [], "first (miss, writes the file)": [], "second (hit)": []}
    file_bytes = 0
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            times["no cache"].append(convert(model, args.size, args.backend, False))
            times["first (miss, writes the file)"].append(convert(model, args.size, args.backend, cache))
            hits = [convert(model, args.size, args.backend, cache) for _ in range(args.hits)]
            times["second (hit)"].append(statistics.median(hits))
            file_bytes = sum(p.stat().st_size for p in Path(cache).glob("*.safetensors"))

    median = {k: statistics.median(v) for k, v in times.items()}
    first, hit = median["first (miss, writes the file)"], median["second (hit)"]
    print(f"YOLOv4 {args.size}x{args.size}, {args.backend} backend, median of {args.rounds} round(s), "
          f"{args.hits} hit(s) each; cache file {file_bytes / 1e6:.0f} MB\n")
    print(f"{'conversion':32}  {'seconds':>8}  {'first / this':>12}")
    for label, seconds in median.items():
        print(f"{label:32}  {seconds:8.2f}  {first / seconds:12.1f}")
    print(f"\nsecond conversion {first / hit:.1f}x faster than the first "
          f"({median['no cache'] / hit:.1f}x faster than converting without the cache)")

    if args.profile:
        with tempfile.TemporaryDirectory() as cache:
            convert(model, args.size, args.backend, cache)
            columns = {"no cache": profile(model, args.size, args.backend, False),
                       "hit": profile(model, args.size, args.backend, cache)}
        print(f"\n{'where the time goes (cProfile)':36}  {'no cache s':>10}  {'hit s':>8}")
        for label, *_ in STEPS:
            print(f"{label:36}  {columns['no cache'][label]:10.2f}  {columns['hit'][label]:8.2f}")


if __name__ == "__main__":
    main()
