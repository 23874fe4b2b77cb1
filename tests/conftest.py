"""Test tiers: default (emulated backend / pure torch), ``ttnn_mock`` (the real ttnn library in mock
mode: no hardware, nothing computed) and ``device`` (real Tenstorrent hardware, skipped otherwise)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


# The suite's weight cache cap, unless TTSWAP_CACHE_MAX_BYTES is set: room for a few YOLOv4 entries
# (~260 MB each), so that conversions repeated within a test file still hit.
SUITE_CACHE_MAX_BYTES = "1G"


@pytest.fixture(autouse=True, scope="session")
def _private_weight_cache(tmp_path_factory):
    """Keep the suite's conversions out of the user's weight cache (and the user's out of ours), capped."""
    previous = {name: os.environ.get(name) for name in ("TTSWAP_CACHE_DIR", "TTSWAP_CACHE_MAX_BYTES")}
    os.environ["TTSWAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("ttswap-cache"))
    os.environ.setdefault("TTSWAP_CACHE_MAX_BYTES", SUITE_CACHE_MAX_BYTES)
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    from ttswap.backends import tenstorrent_device_present

    no_device = pytest.mark.skip(reason="no Tenstorrent device present (/dev/tenstorrent*); run `make test` on a machine with one")
    no_ttnn = pytest.mark.skip(reason="ttnn is not installed: install the project with the [tt] extra")
    has_device = tenstorrent_device_present()
    has_ttnn = importlib.util.find_spec("ttnn") is not None
    for item in items:
        if "device" in item.keywords and not has_device:
            item.add_marker(no_device)
        elif ("ttnn_mock" in item.keywords or "device" in item.keywords) and not has_ttnn:
            if os.environ.get("CI"):
                raise pytest.UsageError("CI must run the ttnn_mock tier, but ttnn is not installed")
            item.add_marker(no_ttnn)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

