"""The pattern matcher: by module type (not by name), one-user interiors, shared inputs."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ttswap.patterns.matcher import Call, Input, Module, match_at
from ttswap.trace import LeafTracer


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.anything = nn.Conv2d(3, 8, 3)  # names are arbitrary: matching goes by type
        self.norm_layer = nn.BatchNorm2d(8)
        self.f = nn.ReLU()

    def forward(self, x):
        return self.f(self.norm_layer(self.anything(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.bn(y)) + y  # y has two users


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(8, 8, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


CBR = Module(nn.ReLU, Module(nn.BatchNorm2d, Module(nn.Conv2d, Input("x"), name="conv"), name="bn"), name="act")


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


def test_matches_by_type_whatever_the_names():
    gm = fx.symbolic_trace(Chain())
    m = match_at(CBR, _node(gm, "f"), gm)
    assert m is not None
    assert [n.target for n in m.nodes] == ["anything", "norm_layer", "f"]
    assert m.inputs["x"].op == "placeholder"
    assert isinstance(m.module(gm, "conv"), nn.Conv2d)
    assert match_at(CBR, _node(gm, "norm_layer"), gm) is None  # root type differs


def test_interior_node_with_other_users_is_not_absorbed():
    gm = fx.symbolic_trace(Branchy())
    assert match_at(CBR, _node(gm, "act"), gm) is None
    bn_act = Module(nn.ReLU, Module(nn.BatchNorm2d, Input("y")))
    m = match_at(bn_act, _node(gm, "act"), gm)
    assert m is not None and m.inputs["y"].target == "conv"


def test_shared_input_must_bind_one_node():
    gm = fx.symbolic_trace(SE())
    se = Call(operator.mul, Input("x"), Module(nn.Hardsigmoid, Module(nn.Conv2d, Call("mean", Input("x")))))
    m = match_at(se, _node(gm, operator.mul), gm)
    assert m is not None and len(m.nodes) == 4 and list(m.inputs) == ["x"]
    wrong = Call(operator.mul, Input("x"), Module(nn.Hardsigmoid, Input("x")))
    assert match_at(wrong, _node(gm, operator.mul), gm) is None


def test_list_patterns_match_cat_arguments():
    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([torch.relu(x), x], dim=1)

    gm = fx.symbolic_trace(Cat())
    pattern = Call(torch.cat, [Call(torch.relu, Input("x")), Input("x")])
    m = match_at(pattern, _node(gm, torch.cat), gm)
    assert m is not None and list(m.inputs) == ["x"]
    assert match_at(Call(torch.cat, [Input("x"), Input("x")]), _node(gm, torch.cat), gm) is None


# -- the registry: rewriters indexed by the op their pattern ends in ----------------------------------

def test_rewriters_are_tried_only_where_their_pattern_can_end():
    import timm.layers

    from ttswap.patterns import rewriters, rewriters_at

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = timm.layers.BatchNormAct2d(8)  # a BatchNorm2d subclass: indexed through its bases
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return torch.cat([self.pool(self.bn(self.conv(x))), x[:, :8, :3, :3]], dim=1)

    net = Net()
    gm = fx.GraphModule(net, LeafTracer().trace(net))  # BatchNormAct2d stays one module, as convert traces it
    names = {n.name: {r.name for r in rewriters_at(n, gm)} for n in gm.graph.nodes}
    assert "conv" in names["conv"] and not names["conv"] & {"maxpool", "batchnorm", "concat", "add"}
    assert {"conv", "batchnorm", "separable_conv"} <= names["bn"] and "maxpool" not in names["bn"]
    assert "maxpool" in names["pool"] and not names["pool"] & {"conv", "concat"}
    assert {"concat", "spp"} <= names["cat"] and "maxpool" not in names["cat"]
    assert names["x"] == set() and names["output"] == set()
    every = {r.name for r in rewriters()}
    assert len(every) > len(names["bn"])  # the index narrows what is tried
    tried = rewriters_at(_node(gm, "bn"), gm)
    assert [r.size for r in tried] == sorted((r.size for r in tried), reverse=True)  # larger patterns first


def test_call_arg_reads_positional_or_keyword_arguments():
    from ttswap.trace import call_arg

    class Means(nn.Module):
        def forward(self, x):
            return x.mean((2, 3), keepdim=True) + x.mean(dim=(2, 3), keepdim=True)

    gm = fx.symbolic_trace(Means())
    first, second = (n for n in gm.graph.nodes if n.target == "mean")
    for node in (first, second):
        assert call_arg(node, 1, "dim") == (2, 3) and call_arg(node, 2, "keepdim") is True
    assert call_arg(first, 3, "dtype", "default") == "default"


def test_specs_from_torch_modules():
    import pytest

    from ttswap.config import Conv2dSpec, Pool2dSpec

    spec = Conv2dSpec.from_torch(nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=8))
    assert spec == Conv2dSpec(8, 16, (3, 5), (2, 2), (1, 2), (1, 1), 8)
    with pytest.raises(ValueError, match="padding='same'"):
        Conv2dSpec.from_torch(nn.Conv2d(8, 8, 3, padding="same"))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        Conv2dSpec.from_torch(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    pool = Pool2dSpec.from_torch(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert pool == Pool2dSpec((3, 3), (2, 2), (1, 1), ceil_mode=True)
    assert Pool2dSpec.from_torch(nn.AvgPool2d(2)) == Pool2dSpec((2, 2), (2, 2))  # no stride: the kernel's
    with pytest.raises(ValueError, match="return_indices"):
        Pool2dSpec.from_torch(nn.MaxPool2d(2, return_indices=True))


def test_an_activation_without_a_device_kernel_is_unsupported_with_its_name():
    import pytest

    from ttswap.activations import activation_of_module
    from ttswap.unsupported import Unsupported

    with pytest.raises(Unsupported, match=r"activation GELU\(approximate='tanh'\) has no device implementation"):
        activation_of_module(nn.GELU(approximate="tanh"))
    with pytest.raises(Unsupported, match="activation Softplus has no device implementation"):
        activation_of_module(nn.Softplus())
