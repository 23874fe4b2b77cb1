"""A conversion in a process of its own, for the weight cache's fault tests (tests/test_cache_faults.py).

    python tests/cache_child.py MODE CACHE_DIR [SEED]

MODE: ``convert`` (plain); ``race`` (wait for the other racer at a barrier in CACHE_DIR's parent, and
take half a second over the write, so that both write at once); ``killed`` (write half the file, say
``writing`` and wait to be killed); ``full-disk`` (files may not grow beyond 1 KiB: RLIMIT_FSIZE, with
SIGXFSZ ignored so that a write fails with EFBIG instead of killing the process); ``read-only``
(converts SEED 0, then SEED 1: the parent made the directory read-only and filled it with SEED 0).
Prints one JSON line: the warnings, the ttswap log lines and a checksum of the output per conversion.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

SHAPE = (1, 3, 16, 16)
# The cache key includes a digest of ttswap's source, computed once per process. The parent and its
# children must agree on keys even if the tree is edited during a long session: both use this instead.
SOURCE_DIGEST = "cache-fault-tests"
RECIPE_TOML = '[recipe]\nname = "tiny"\n[defaults]\nweight_dtype = "bfp8_b"\nfidelity = "LoFi"\n'


def tiny_model(seed: int = 0) -> nn.Module:
    """Two convs, one with BatchNorm: a cache entry of a few KB, converted in well under a second."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def convert(seed: int, cache) -> float:
    """Convert, run, and return the output's sum (the same in every process for the same seed)."""
    import ttswap
    from ttswap.recipe import Recipe

    converted = ttswap.convert(tiny_model(seed), Recipe.from_toml(RECIPE_TOML), input_shape=SHAPE,
                               backend="emulated", cache=cache)
    return float(converted(torch.linspace(-1, 1, 768).reshape(SHAPE)).double().sum())


def _patch_save_file(after_write) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        after_write(Path(filename))

    safetensors.torch.save_file = save_file


def _barrier(directory: Path, parties: int = 2) -> None:
    (directory / f"ready-{time.time_ns()}").touch()
    deadline = time.time() + 60
    while len(list(directory.glob("ready-*"))) < parties and time.time() < deadline:
        time.sleep(0.01)


def main(mode: str, cache: str, seed: int = 0) -> None:
    import ttswap.cache  # imported before any limit: a failed .pyc write must not count

    ttswap.cache._source_digest = lambda: SOURCE_DIGEST  # see SOURCE_DIGEST

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ttswap").addHandler(handler)
    logging.getLogger("ttswap").setLevel(logging.INFO)

    if mode == "race":
        _patch_save_file(lambda _: time.sleep(0.5))
        _barrier(Path(cache).parent)
    elif mode == "killed":
        def half_written(temp: Path) -> None:
            data = temp.read_bytes()
            temp.write_bytes(data[: len(data) // 2])
            print("writing", flush=True)
            time.sleep(120)  # the parent kills us here

        _patch_save_file(half_written)
    elif mode == "full-disk":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    sums = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in ((0, 1) if mode == "read-only" else (seed,)):
            sums.append(convert(s, cache))
    print(json.dumps({"warnings": [f"{w.category.__name__}: {w.message}" for w in caught], "log": lines,
                      "sums": sums}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
