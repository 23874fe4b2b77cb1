"""A converted model refuses what the original torch module refuses, with a message naming what it takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ttswap

SHAPE = (1, 3, 16, 16)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    return model, ttswap.convert(model, "ese_vovnet", input_shape=SHAPE, backend="emulated", cache=False)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32, torch.bool])
def test_non_floating_inputs_name_the_expected_dtype_and_shape(models, dtype):
    original, converted = models
    x = torch.ones(SHAPE, dtype=dtype)
    with pytest.raises(RuntimeError):  # torch refuses it
        original(x)
    with pytest.raises(TypeError, match=rf"input 'input' must be a float32 tensor of shape \[1, 3, 16, 16\], "
                                        rf"got {dtype} of shape \[1, 3, 16, 16\].*x.float\(\) / 255"):
        converted(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_refused_as_the_original_module_refuses_them(models, dtype):
    original, converted = models
    x = torch.ones(SHAPE, dtype=dtype)
    with pytest.raises(RuntimeError, match="should be the same"):  # float32 parameters: torch refuses
        original(x)
    with pytest.raises(TypeError, match=rf"got {dtype}: the original module has float32 parameters.*x.float\(\)"):
        converted(x)
    assert converted(x.float()).shape == (1, 8, 16, 16)


def test_a_wrong_number_of_inputs_names_what_the_model_takes(models):
    _, converted = models
    x = torch.ones(SHAPE)
    for inputs in ((), (x, x)):
        with pytest.raises(TypeError, match=rf"this model takes 1 input\(s\) \(input: a float32 tensor of shape "
                                            rf"\[1, 3, 16, 16\]\), got {len(inputs)}"):
            converted(*inputs)
    with pytest.raises(TypeError, match="input 'input' must be a float32 tensor of shape .*, got list"):
        converted([x])
