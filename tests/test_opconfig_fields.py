"""Every OpConfig field must do something on both backends: the ttnn backend forwards it to ttnn (the
arguments its ttnn.conv2d call receives change when the field flips), and the emulated backend
honours it (values, dtype, placement or resident L1 change). A new field without a case here fails."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch

from ttswap.backends.emulated import EmulatedBackend
from ttswap.config import Conv2dSpec, DType, Fidelity, OpConfig, ShardLayout

SPEC = Conv2dSpec(64, 64, (3, 3), padding=(1, 1))
BASE = OpConfig(shard=ShardLayout.HEIGHT, weight_dtype=DType.BF16, fidelity=Fidelity.HIFI2, fp32_acc=True)

# field -> the value it flips to, from BASE (with a conv on a 1x64x56x56 input)
FLIPS: dict[str, Any] = {
    "shard": ShardLayout.BLOCK,
    "act_dtype": DType.BFP8_B,
    "weight_dtype": DType.BFP8_B,
    "fidelity": Fidelity.LOFI,
    "fp32_acc": False,
    "act_block_h": 128,  # 98 output tile-rows: 49 cores of 2 become 25 of 4
    "deallocate": False,
    "packer_l1_acc": True,
}


def test_every_field_has_a_flip():
    assert set(FLIPS) == {f.name for f in dataclasses.fields(OpConfig)}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(1, 64, 56, 56, generator=gen))
    w = torch.randn(64, 64, 3, 3, generator=gen) * 0.06
    b = torch.randn(64, generator=gen) * 0.3
    return x, w, b


def _emulated_observation(cfg: OpConfig) -> tuple:
    """What an emulated conv gives: its values, dtype and placement, and the L1 that stays resident
    (the input too, unless deallocate frees it)."""
    backend = EmulatedBackend()
    x, w, b = _inputs()
    t = backend.upload(x, cfg)
    y = backend.conv2d(t, backend.prepare_conv(w, b, SPEC, cfg, "c"), SPEC, cfg, "c")
    return y.payload, y.dtype, y.memory, backend.resident.bytes_besides(())


@pytest.mark.parametrize("field", sorted(FLIPS))
def test_emulated_backend_honours_field(field):
    base = _emulated_observation(BASE)
    flipped = _emulated_observation(BASE.replace(**{field: FLIPS[field]}))
    same_values = torch.equal(base[0], flipped[0])
    assert not (same_values and base[1:] == flipped[1:]), f"{field} changes nothing in the emulated backend"


@pytest.mark.ttnn_mock
@pytest.mark.parametrize("field", sorted(FLIPS))
def test_ttnn_backend_forwards_field(field, monkeypatch):
    import ttnn

    from ttswap.backends.ttnn_backend import TtnnBackend

    calls: list[dict[str, str]] = []
    real = ttnn.conv2d

    def spy(**kwargs: Any):
        calls.append({key: _describe(value) for key, value in kwargs.items()
                      if key not in ("input_tensor", "weight_tensor", "bias_tensor", "device")})
        return real(**kwargs)

    monkeypatch.setattr(ttnn, "conv2d", spy)
    backend = TtnnBackend()
    x, w, b = _inputs()
    for cfg in (BASE, BASE.replace(**{field: FLIPS[field]})):
        t = backend.upload(x, cfg)
        backend.conv2d(t, backend.prepare_conv(w, b, SPEC, cfg, "c"), SPEC, cfg, "c")
    assert len(calls) == 2
    assert calls[0] != calls[1], f"{field} does not reach ttnn.conv2d"


def _describe(value: Any) -> str:
    """A comparable text of a ttnn argument; compute-kernel configs print no fields, so read them."""
    text = repr(value)
    if " object at 0x" in text:
        attrs: Callable[[str], bool] = lambda a: not a.startswith("_") and not callable(getattr(value, a))
        return str({a: str(getattr(value, a)) for a in dir(value) if attrs(a)})
    return text


@pytest.mark.parametrize("field", sorted(FLIPS))
def test_recipes_read_and_write_field(field):
    from ttswap.recipe import parse_overrides

    flipped = BASE.replace(**{field: FLIPS[field]})
    written = flipped.to_dict()[field]  # what a recipe file holds
    assert parse_overrides({field: written}, "recipe") == {field: FLIPS[field]}
