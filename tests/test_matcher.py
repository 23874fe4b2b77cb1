"""The pattern matcher: by module type (not by name), one-user interiors, shared inputs."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ttswap.patterns.matcher import Call, Input, Module, match_at


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
