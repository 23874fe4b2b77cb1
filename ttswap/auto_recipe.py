"""The "auto" recipe: per-layer shard layout, act_block_h and numerics, chosen for one model.

``ttswap.convert(model, "auto", input_shape=...)`` (or ``convert(model, AutoRecipe(...))``) tunes a
recipe for ``model`` before converting it:

1. **Layouts.** The model is converted once at the most accurate numerics with ttnn's default
   sharding and one forward pass is observed (``ttswap.cost.observe``). For every layer that runs
   convolutions, each shard layout (height, block, width) and ``act_block_h`` is priced with the
   Wormhole cost model (``ttswap.cost.conv2d_cost``, input reshards included) and checked against the
   per-core L1 budget (``ttswap.backends.l1.estimate_conv_l1`` plus the L1 other live tensors held at
   that point); the fastest that fits wins.
2. **Numerics.** Math fidelity and weight dtype decide accuracy (LoFi reads 5 bits of each weight)
   far more than they decide time (most layers at batch 1 are bound by launch or data movement, not
   the matrix engine). Each layer gets a rung of ``LADDER``, most accurate first, and every layer's
   time on every rung is estimated. One forward pass measures what each layer adds to the error on
   its own per rung (it runs on the inputs the all-top-rung model gives it). Steps down the ladder
   are ordered by time saved per squared error added (independent errors add in quadrature), and
   the search applies the longest prefix of that order whose logits (every output, worst one) keep
   their PCC against the torch fp32 model on sample images at ``pcc_target``, found by bisection with
   the real converted model. The step that breaks the target is skipped (the layer's note says so)
   and the search goes on with the rest, within ``max_evaluations`` forward passes. Steps saving
   under ``MIN_GAIN_S`` are not taken: those layers keep the most accurate numerics. So does every
   layer when the steps taken would save under ``min_numerics_gain`` of the model's device time
   together: no accuracy is traded for a percent of speed. The bfloat8_b guard
   (``Recipe.bfp8_guard``) still keeps bf16 weights where a channel would lose too much.
3. **The target backend.** Converting for ttnn (a device, or mock mode), the tuned recipe runs one
   forward pass there first (``fit_on``): a layer ttnn finds short of L1, which the estimate cannot
   foresee when the free L1 is fragmented, gives up fp32 accumulation, then takes its next best layout.

The result is an ordinary ``Recipe`` with one rule per device layer, whose note (shown in the
conversion report) says what was chosen and why: estimated time and bound, cores, L1 per core, and the
numerics decision. The search aims at ``pcc_target`` plus ``margin``, or, where the most accurate rung
leaves less room than that (a network whose outputs amplify any rounding), at "within
``relative_slack`` of the most accurate rung's error", never below ``pcc_target`` while the most
accurate rung reaches it. The recipe's description says which.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ttswap.backends.base import L1_ALLOCATABLE_BYTES, Backend, DeviceTensor, L1BudgetError, MemorySpec
from ttswap.backends.emulated import EmulatedBackend
from ttswap.backends.l1 import estimate_conv_l1
from ttswap.config import DType, Fidelity, OpConfig, ShardLayout
from ttswap.cost import N150, OpCall, WormholeN150, conv2d_cost, conv_grid, cost_report, observe, top_level_layers
from ttswap.metrics import pcc
from ttswap.modules import TTModule
from ttswap.recipe import Recipe, Rule

log = logging.getLogger("ttswap")

LAYOUTS = (ShardLayout.HEIGHT, ShardLayout.BLOCK, ShardLayout.WIDTH)
ACT_BLOCK_HS = (None, 512, 256, 128, 64, 32)  # None: ttnn's default, the whole shard per block
MIN_GAIN_S = 1e-6  # a cheaper rung must save at least this much on a layer to be worth its error


@dataclass(frozen=True)
class Rung:
    """One step of the numerics ladder."""

    fidelity: Fidelity
    weight_dtype: DType
    fp32_acc: bool = False

    def __str__(self) -> str:
        return f"{self.fidelity.value} {self.weight_dtype.value}" + (" fp32-acc" if self.fp32_acc else "")

    def apply(self, cfg: OpConfig) -> OpConfig:
        return cfg.replace(fidelity=self.fidelity, fp32_acc=self.fp32_acc)  # weight dtype: see _Hybrid


LADDER = (  # most accurate first
    Rung(Fidelity.HIFI4, DType.BF16, fp32_acc=True),
    Rung(Fidelity.HIFI4, DType.BF16),
    Rung(Fidelity.HIFI4, DType.BFP8_B),
    Rung(Fidelity.HIFI2, DType.BFP8_B),
    Rung(Fidelity.LOFI, DType.BFP8_B),
)


Group = tuple[str, str]  # (layer name, rewriter): what one recipe rule addresses


@dataclass
class LayerChoice:
    """What the auto recipe chose for one device layer, and the numbers behind it. A recipe rule
    addresses a layer name and a rewriter; one choice covers every module the layer holds (``keys``)."""

    layer: str
    rewriter: str
    keys: list[str] = field(default_factory=list)  # graph targets of the modules it covers
    shard: ShardLayout | None = None  # None: not a conv layer, ttnn's placement is kept
    act_block_h: int | None = None
    l1_bytes: dict[DType, int] = field(default_factory=dict)  # peak conv L1 per core, by weight dtype
    layouts_fitting: int = 0
    bfp8_only: bool = False  # bf16 weights fit no layout: every rung uses bfloat8_b
    alternatives: list[tuple[ShardLayout, int | None, DType]] = field(default_factory=list)  # next best, in order
    rung: int = 0
    seconds: list[float] = field(default_factory=list)  # estimated time per rung
    bound: str = ""
    cores: int = 0
    errors: list[float] = field(default_factory=list)  # relative error the layer adds on its own, per rung
    blocked: list[tuple[int, float]] = field(default_factory=list)  # (rung, saving) moves that broke the PCC
    target: float = float("nan")  # the PCC the search kept
    kept_because: str = ""  # why the whole model kept the most accurate numerics, if it did
    on_device: str = ""  # what running on the target backend changed, and why

    @property
    def numerics_reason(self) -> str:
        if self.on_device:
            return self.on_device
        if self.kept_because:
            return f"kept {LADDER[0]}: {self.kept_because}"
        if self.blocked:
            rung, saving = self.blocked[0]
            broke = (f"{LADDER[rung]} ({self._error(rung)} error here) would save {saving * 1e6:.1f} us "
                     f"but break PCC >= {self.target:.4f}")
            return f"kept {LADDER[self.rung]}: {broke}"
        if self.rung:
            return f"{LADDER[self.rung]} ({self._error(self.rung)} error here) keeps PCC >= {self.target:.4f}"
        if len(self.seconds) > 1 and self.seconds[0] - min(self.seconds) < MIN_GAIN_S:
            return "cheaper numerics save < 1 us here"
        return "most accurate numerics"

    def _error(self, rung: int) -> str:
        return f"{self.errors[rung]:.2%}" if len(self.errors) > rung else "unmeasured"

    def fall_back(self) -> bool:
        """Take the next best layout (the chosen one failed L1 at run time); False if none is left."""
        if not self.alternatives:
            return False
        self.shard, self.act_block_h, dtype = self.alternatives.pop(0)
        self.bfp8_only = dtype is DType.BFP8_B and LADDER[0].weight_dtype is not DType.BFP8_B
        return True

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.shard is not None:
            out.update(shard=self.shard, act_block_h=self.act_block_h)
        rung = LADDER[self.rung]
        if self.rung or self.bfp8_only:
            out.update(fidelity=rung.fidelity, fp32_acc=rung.fp32_acc,
                       weight_dtype=DType.BFP8_B if self.bfp8_only else rung.weight_dtype)
        return out

    def note(self) -> str:
        where = ""
        if self.shard is not None:
            block = f" act_block_h={self.act_block_h}" if self.act_block_h else ""
            where = f"{self.shard.value}{block} (fastest of {self.layouts_fitting} fitting layouts), "
        seconds = self.seconds[self.rung] if self.seconds else float("nan")
        dtype = DType.BFP8_B if self.bfp8_only else LADDER[self.rung].weight_dtype
        l1 = f", L1 {self.l1_bytes[dtype] / 1024:.0f} KiB/core" if dtype in self.l1_bytes else ""
        return (f"auto: {where}{LADDER[self.rung]}; est {seconds * 1e6:.1f} us {self.bound}-bound on "
                f"{self.cores} cores{l1}; {self.numerics_reason}")


@dataclass
class Tuning:
    """The tuned recipe and how it was found."""

    recipe: Recipe
    choices: dict[Group, LayerChoice]
    pcc: float  # of the chosen configuration on the samples
    top_pcc: float  # with every layer on the top rung
    target: float
    evaluations: int
    seconds: float  # tuning wall time


@dataclass(eq=False)
class AutoRecipe(Recipe):
    """A recipe that tunes itself for each model it converts (see the module docstring).

    ``samples`` are the inputs the PCC guard runs (default: scikit-image's sample photos at the input
    size, ImageNet-normalised; pass your own for other preprocessing). The search keeps the worst
    output's PCC on them at ``pcc_target`` plus ``margin``, or within ``relative_slack`` of the most
    accurate numerics' error where those leave less room (see the module docstring).
    ``max_evaluations`` bounds its forward passes."""

    name: str = "auto"
    bfp8_guard: float | None = 0.05
    source: str = "auto"
    pcc_target: float = 0.99
    margin: float = 0.005  # aimed above the target, so that inputs other than the samples pass it too
    relative_slack: float = 0.1
    samples: torch.Tensor | None = None
    max_evaluations: int = 24
    # Cheaper numerics must save at least this share of the device time to be worth any accuracy:
    # below it, every layer keeps the most accurate rung (YOLOv4 would trade 0.04 of head PCC for 1%).
    min_numerics_gain: float = 0.03
    hw: WormholeN150 = N150

    def for_model(self, model: nn.Module, input_shape: Sequence[int], backend: Backend | None = None) -> Recipe:
        tuning = tune(model, tuple(input_shape), self)
        if backend is None or isinstance(backend, EmulatedBackend):
            return tuning.recipe
        return fit_on(backend, model, tuning, tuple(input_shape))


def fit_on(backend: Backend, model: nn.Module, tuning: Tuning, input_shape: tuple[int, ...]) -> Recipe:
    """``tuning.recipe``, changed until one forward pass runs on ``backend`` (ttnn: on a device or in
    mock mode) without running out of L1. The tuner's L1 estimate does not model fragmentation: a
    layer can fit in total and still find its buffers' region taken. Such a layer first gives up
    fp32 accumulation (its largest buffer), then takes its next best layout."""
    recipe = tuning.recipe
    base = dataclasses.replace(recipe, rules=[])
    while True:  # ends: each pass lowers one layer's rung or uses up one of its alternatives
        try:
            _convert(model, recipe, input_shape, backend)(torch.zeros(input_shape))
            return recipe
        except L1BudgetError as error:
            choice = _choice_of(error.layer, tuning.choices)
            if choice is None:
                raise
            if LADDER[choice.rung].fp32_acc:
                choice.rung = next(i for i, rung in enumerate(LADDER) if i > choice.rung and not rung.fp32_acc)
                change = f"{LADDER[choice.rung]}"
            elif choice.fall_back():
                change = f"{choice.shard.value} act_block_h={choice.act_block_h or 'default'}"
            else:
                raise
            choice.on_device = (f"on {type(backend).__name__} it needs {error.needed:,} B of L1 where "
                                f"{error.available:,} B are free (fragmentation), so {change}")
            log.info("auto recipe: %s: %s", error.layer, choice.on_device)
            recipe = _with_rules(base, tuning.choices, notes=True)


def tune(model: nn.Module, input_shape: tuple[int, ...], settings: AutoRecipe | None = None) -> Tuning:
    """Tune a recipe for ``model`` at ``input_shape``; ``Tuning.recipe`` is what ``convert`` uses."""
    settings = settings or AutoRecipe()
    start = time.perf_counter()
    samples = _samples(settings, input_shape)
    with torch.no_grad():
        reference = _outputs(model.eval()(samples))

    top = LADDER[0]
    base = Recipe(name="auto", defaults=OpConfig(fidelity=top.fidelity, weight_dtype=top.weight_dtype,
                                                 fp32_acc=top.fp32_acc),
                  bfp8_guard=settings.bfp8_guard, source="auto")
    log.info("auto recipe: observing %s at %s", type(model).__name__, list(input_shape))
    baseline, calls = _observe_baseline(model, base, input_shape)
    backend = EmulatedBackend()  # one for both variants, so that observing the mix sees every layer's ops
    choices = _choose_layouts(baseline, calls, settings.hw)
    log.info("auto recipe: layouts chosen for %d layer(s); pricing their numerics", len(choices))
    hybrid, observed = _build_variants(model, base, choices, input_shape, backend)
    _price_rungs(hybrid, observed, choices, settings.hw)

    evaluate = _Evaluator(hybrid, samples, reference, input_shape[0], settings.max_evaluations)
    assignment = {group: 0 for group in choices}
    top_pcc = evaluate.last_passing = evaluate(assignment)
    # The margin keeps unseen inputs above the target; where the most accurate numerics leave less room
    # than the margin, "at most relative_slack more error than them" decides, so the target moves
    # smoothly with top_pcc instead of dropping to pcc_target with no margin at all.
    within_slack = 1.0 - (1.0 - top_pcc) * (1.0 + settings.relative_slack)
    target = min(settings.pcc_target + settings.margin, within_slack)
    if top_pcc >= settings.pcc_target:
        target = max(target, settings.pcc_target)
        why = "" if target == settings.pcc_target + settings.margin else \
            f": at most {settings.relative_slack:.0%} more error than the most accurate numerics' {top_pcc:.4f}"
        goal = f"PCC >= {settings.pcc_target:g} (aiming at {target:.4f} on the samples{why})"
    else:
        goal = (f"PCC >= {target:.4f}: the most accurate numerics reach only {top_pcc:.4f} < {settings.pcc_target:g}, "
                f"so at most {settings.relative_slack:.0%} more error than them")
    log.info("auto recipe: top rung PCC %.4f; target %s", top_pcc, goal)
    errors = hybrid.local_errors(samples[:input_shape[0]])
    for choice in choices.values():  # a group's modules add independent errors: in quadrature
        choice.errors = [math.hypot(*column) for column in zip(*(errors[key] for key in choice.keys))]
    top_total = sum(c.seconds[0] for c in choices.values())
    worth = settings.min_numerics_gain * top_total
    _search(choices, assignment, evaluate, target, worth)
    final_pcc = evaluate.last_passing
    total = sum(c.seconds[assignment[g]] for g, c in choices.items())
    if top_total - total < worth:
        kept = (f"the cheaper numerics PCC >= {target:.4f} allows would save under {settings.min_numerics_gain:.0%} "
                f"of the device time, too little to be worth any accuracy")
        log.info("auto recipe: %s; every layer keeps %s", kept, top)
        assignment = {group: 0 for group in choices}
        final_pcc, total = top_pcc, top_total
        goal += f"; {kept}"
        for choice in choices.values():
            choice.kept_because, choice.blocked = kept, []
    for group, choice in choices.items():
        choice.rung = assignment[group]
    recipe = _with_rules(base, choices, notes=True)
    recipe.description = (f"auto-tuned for {type(model).__name__} at {list(input_shape)}: {goal}; PCC {final_pcc:.4f} "
                          f"on {len(samples)} sample(s) ({evaluate.count} evaluations); estimated device time "
                          f"{total * 1e3:.3f} ms against {top_total * 1e3:.3f} ms with every layer at {top}")
    log.info("auto recipe: %s", recipe.description)
    return Tuning(recipe, choices, final_pcc, top_pcc, target, evaluate.count, time.perf_counter() - start)


# -- conversions ------------------------------------------------------------------------------------


def _convert(model: nn.Module, recipe: Recipe, input_shape: tuple[int, ...], backend: Backend):
    from ttswap.converter import convert

    # throwaway conversions for the search: the weight cache would only fill up with them, and their
    # progress lines would read as if they were the user's conversion
    level = log.level
    log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    try:
        return convert(model, recipe, input_shape=input_shape, backend=backend, cache=False)
    finally:
        log.setLevel(level)


def _observe_baseline(model: nn.Module, base: Recipe, input_shape: tuple[int, ...]):
    """One conversion and forward pass that show every op, its shapes and what else is live in L1, at
    the top rung with ttnn's default placement, on a backend that does not enforce L1 (layouts that
    fit are chosen afterwards, per layer). Where even the conversion's static estimates exceed L1,
    the smallest buffers instead: bfloat8_b weights, 32-row act blocks, bf16 accumulation."""
    from ttswap.converter import ConversionError

    error: Exception | None = None
    for recipe in (base, base.override(weight_dtype="bfp8_b", act_block_h=32, fp32_acc=False)):
        try:
            converted = _convert(model, recipe, input_shape, EmulatedBackend(check_l1=False))
            return converted, observe(converted)
        except ConversionError as exc:
            error = exc
    raise ConversionError(f"auto recipe: even with bfloat8_b weights, act_block_h=32 and bf16 accumulation, the "
                          f"model's default placement exceeds L1, so its ops cannot be observed: {error}")


def _build_variants(model: nn.Module, base: Recipe, choices: dict[Group, LayerChoice], input_shape: tuple[int, ...],
                    backend: EmulatedBackend):
    """Both weight-dtype conversions with the chosen layouts, each observed once. A layer whose
    choice fails L1 at run time (the estimate left too little room for what else was live) takes
    its next best layout, and the conversions are redone."""
    while True:
        variants = {dtype: _convert(model, _with_rules(base.override(weight_dtype=dtype.value), choices), input_shape,
                                    backend) for dtype in (DType.BF16, DType.BFP8_B)}
        hybrid = _Hybrid(variants)
        try:
            observed = {}
            for dtype in variants:
                hybrid.set(lambda group, dtype=dtype: Rung(Fidelity.LOFI, dtype))
                observed[dtype] = observe(hybrid.model)
            return hybrid, observed
        except L1BudgetError as error:
            choice = _choice_of(error.layer, choices)
            if choice is None or not choice.fall_back():
                raise
            log.info("auto recipe: %s needs %d B of L1 at run time; trying %s", error.layer, error.needed,
                     choice.shard.value)


def _choice_of(layer: str, choices: dict[Group, LayerChoice]) -> LayerChoice | None:
    """The conv layer choice an op's layer name belongs to (a separable conv's depthwise half is
    named after its own module, below the choice's)."""
    owners = [c for c in choices.values()
              if c.shard is not None and (layer == c.layer or layer.startswith(c.layer + "."))]
    return max(owners, key=lambda c: len(c.layer), default=None)


def _with_rules(base: Recipe, choices: dict[Group, LayerChoice], notes: bool = False) -> Recipe:
    """``base`` plus one rule per layer: its layout (and, with ``notes``, its numerics and note)."""
    rules = []
    for choice in choices.values():
        overrides = choice.overrides() if notes else _layout_overrides(choice)
        if overrides or notes:
            rules.append(Rule(glob.escape(choice.layer), overrides, (choice.rewriter,), label=f"auto {choice.layer}",
                              note=choice.note() if notes else ""))
    return dataclasses.replace(base, rules=[*base.rules, *rules])


def _layout_overrides(choice: LayerChoice) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if choice.shard is not None:
        out.update(shard=choice.shard, act_block_h=choice.act_block_h)
    if choice.bfp8_only:
        out.update(weight_dtype=DType.BFP8_B)
    return out


# -- layouts ---------------------------------------------------------------------------------------


def _choose_layouts(converted, calls: list[OpCall], hw: WormholeN150) -> dict[Group, LayerChoice]:
    """For each conv layer, the fastest (shard, act_block_h) that fits L1, taking the placement of
    its input from the layouts already chosen upstream. Other layers keep ttnn's placement."""
    choices: dict[Group, LayerChoice] = {}
    group_of: dict[str, Group] = {}
    for key, module in top_level_layers(converted).items():
        group = group_of[key] = (module.layer, module.info.rewriter)
        choices.setdefault(group, LayerChoice(*group)).keys.append(key)
    convs_of: dict[Group, list[int]] = {}
    for i, call in enumerate(calls):
        if call.op == "conv2d" and call.key in group_of:
            convs_of.setdefault(group_of[call.key], []).append(i)

    placed: dict[int, MemorySpec] = {}  # call index -> output placement under the choices so far
    for i, call in enumerate(calls):
        if call.op in ("activation", "add", "multiply"):
            _follow(calls, i, placed)
        group = group_of.get(call.key)
        if call.op != "conv2d" or group is None or convs_of[group][0] != i:
            continue
        convs = convs_of[group]
        cfg0 = LADDER[0].apply(call.args["cfg"])  # the top rung, whatever the baseline had to use
        options = []
        for dtype in dict.fromkeys((LADDER[0].weight_dtype, DType.BFP8_B)):  # bfloat8_b only if bf16 fits nowhere
            for shard in LAYOUTS:
                for block in ACT_BLOCK_HS:
                    cfg = cfg0.replace(shard=shard, act_block_h=block, weight_dtype=dtype)
                    priced = _price_convs(calls, convs, cfg, placed, hw)
                    if priced is not None:
                        options.append((*priced, shard, block, dtype))
            if options:
                break
        choice = choices[group]
        if not options:
            log.warning("auto recipe: no layout of %s fits L1; keeping ttnn's default placement", choice.layer)
            continue
        options.sort(key=lambda o: o[0])
        _, l1, outputs, shard, block, dtype = options[0]
        choice.shard, choice.act_block_h, choice.l1_bytes[dtype] = shard, block, l1
        choice.alternatives = [(o[3], o[4], o[5]) for o in options[1:]]
        if dtype is not DType.BFP8_B:
            bfp8 = cfg0.replace(shard=shard, act_block_h=block, weight_dtype=DType.BFP8_B)
            choice.l1_bytes[DType.BFP8_B] = _price_convs(calls, convs, bfp8, placed, hw)[1]
        choice.layouts_fitting = len(options)
        choice.bfp8_only = dtype is not LADDER[0].weight_dtype
        placed.update(outputs)
    return choices


def _follow(calls: list[OpCall], i: int, placed: dict[int, MemorySpec]) -> None:
    """Eltwise ops place their output like their first input: carry a changed placement through."""
    source = next(iter(calls[i].sources.values()), None)
    if isinstance(source, int) and source in placed:
        placed[i] = placed[source]


def _price_convs(calls: list[OpCall], convs: list[int], cfg: OpConfig, placed: dict[int, MemorySpec],
                 hw: WormholeN150):
    """(seconds, peak L1, output placements) of a layer's convs under ``cfg``; None if one does not
    fit L1 next to the tensors that were live when it ran."""
    local = dict(placed)
    seconds, peak = 0.0, 0
    for j in convs:
        call = calls[j]
        x: DeviceTensor = call.args["x"]
        source = call.sources.get("x")
        if isinstance(source, int) and source in local:
            x = dataclasses.replace(x, memory=local[source])
        spec = call.args["spec"]
        needed = estimate_conv_l1(spec, x.n, x.h, x.w, cfg)[0]
        if needed + call.resident_bytes > L1_ALLOCATABLE_BYTES:
            return None
        peak = max(peak, needed)
        seconds += sum(o.seconds for o in conv2d_cost(x, spec, cfg, call.args["activation"], hw))
        local[j] = conv_grid(x, spec, cfg)[1].memory_spec()
    return seconds, peak, {j: local[j] for j in convs}


# -- numerics --------------------------------------------------------------------------------------


CONTAINER = "ttswap"  # where convert puts the device layers: their graph targets are "ttswap.<key>"


class _Hybrid:
    """Two conversions of one model with the same layouts, bf16 and bfloat8_b weights: any mix of
    rungs is the bf16 conversion with some layers taken from the other, and fidelity and
    accumulation set on each layer's config (they are read at run time)."""

    def __init__(self, variants: dict[DType, Any]):
        self.variants = variants
        self.model = variants[DType.BF16]
        self.container = self.model.graph_module.get_submodule(CONTAINER)
        self.modules = {dtype: dict(v.graph_module.get_submodule(CONTAINER).items()) for dtype, v in variants.items()}
        self.configs = {dtype: {key: [(m, m.info.config) for m in module.modules() if isinstance(m, TTModule)]
                                for key, module in modules.items()} for dtype, modules in self.modules.items()}

    def set(self, rung_of: Callable[[Group], Rung]) -> None:
        for key, module in self.modules[DType.BF16].items():
            rung = rung_of((module.layer, module.info.rewriter))
            self.container[key] = self.modules[rung.weight_dtype][key]
            for m, cfg in self.configs[rung.weight_dtype][key]:
                if cfg is not None:
                    m.info.config = rung.apply(cfg)

    def local_errors(self, sample: torch.Tensor) -> dict[str, list[float]]:
        """Per module (graph target) and rung, the relative error the module adds on its own: each
        runs on the inputs it gets with every layer on the top rung, and its output is compared with
        its top rung output. One forward pass, then one pass over the modules per rung."""
        seen: dict[str, tuple[tuple[DeviceTensor, ...], DeviceTensor]] = {}

        def keeper(key: str) -> Callable:
            def keep(_module: TTModule, args: tuple, output: Any) -> None:
                # copies: the emulated backend counts live tensors against L1, and these stay alive
                seen[key] = (tuple(_detached(a) for a in args), _detached(output))
            return keep

        self.set(lambda group: LADDER[0])
        hooks = [m.register_forward_hook(keeper(f"{CONTAINER}.{key}")) for key, m in self.container.items()]
        try:
            self.model(sample)
        finally:
            for hook in hooks:
                hook.remove()
        errors = {key: [0.0] for key in seen}
        for rung in LADDER[1:]:
            self.set(lambda group, rung=rung: rung)
            for key, module in self.container.items():
                target = f"{CONTAINER}.{key}"
                inputs, want = seen[target]
                got = module(*inputs).payload
                errors[target].append(float((got - want.payload).norm() / want.payload.norm().clamp_min(1e-30)))
        return errors


def _detached(t: Any) -> Any:
    return dataclasses.replace(t, payload=t.payload) if isinstance(t, DeviceTensor) else t


def _price_rungs(hybrid: _Hybrid, observed: dict[DType, list[OpCall]], choices: dict[Group, LayerChoice],
                 hw: WormholeN150) -> None:
    """Estimated time of every layer on every rung: the forward observed per weight dtype, priced
    with each rung's fidelity and accumulation."""
    for rung in LADDER:
        calls = [_with_rung(c, rung) for c in observed[rung.weight_dtype]]
        layers = cost_report(hybrid.model, calls, hw).by_key()
        for choice in choices.values():
            costs = [layers[key] for key in choice.keys]
            choice.seconds.append(sum(c.seconds for c in costs))
            if rung is LADDER[0]:
                slowest = max(costs, key=lambda c: c.seconds)
                choice.bound, choice.cores = slowest.bound, slowest.cores


def _with_rung(call: OpCall, rung: Rung) -> OpCall:
    cfg = call.args.get("cfg")
    if not isinstance(cfg, OpConfig):
        return call
    return dataclasses.replace(call, args={**call.args, "cfg": rung.apply(cfg)})


class _Evaluator:
    """PCC of the hybrid under an assignment of rungs, worst over the model's outputs."""

    def __init__(self, hybrid: _Hybrid, samples: torch.Tensor, reference: list[torch.Tensor], batch: int,
                 budget: int):
        self.hybrid, self.samples, self.reference, self.batch, self.budget = hybrid, samples, reference, batch, budget
        self.count = 0
        self.last_passing = float("nan")

    @property
    def exhausted(self) -> bool:
        return self.count >= self.budget

    def __call__(self, assignment: dict[Group, int]) -> float:
        self.count += 1
        self.hybrid.set(lambda group: LADDER[assignment.get(group, 0)])
        outputs = [_outputs(self.hybrid.model(self.samples[i:i + self.batch]))
                   for i in range(0, len(self.samples), self.batch)]
        value = min(pcc(torch.cat(parts), ref) for parts, ref in zip(zip(*outputs), self.reference))
        lowered = sum(1 for rung in assignment.values() if rung)
        log.info("auto recipe: evaluation %d of at most %d: %d layer(s) below the top rung, PCC %.4f", self.count,
                 self.budget, lowered, value)
        return value


def _moves(choices: dict[Group, LayerChoice]) -> list[tuple[Group, int, float]]:
    """Every layer's steps down the ladder, as (group, rung, saving), best value first.

    A step's value is the time it saves per unit of error it adds (the layer's own relative error,
    squared: independent errors add in quadrature). Per layer the steps follow the lower convex hull
    of (error squared, time) over the rungs, so a layer's steps come out in ladder order and a step
    never skips a rung that is a better deal; steps saving under ``MIN_GAIN_S`` are dropped."""
    moves = []
    for group, choice in choices.items():
        seconds, errors = choice.seconds, [e * e for e in choice.errors]
        current, last_value = 0, math.inf
        while True:
            steps = [(rung, seconds[current] - seconds[rung], errors[rung] - errors[current])
                     for rung in range(current + 1, len(LADDER)) if seconds[current] - seconds[rung] >= MIN_GAIN_S]
            if not steps:
                break
            rung, saving, added = max(steps, key=lambda s: s[1] / max(s[2], 1e-12))
            last_value = min(last_value, saving / max(added, 1e-12))
            moves.append((last_value, group, rung, saving))
            current = rung
    moves.sort(key=lambda m: m[0], reverse=True)
    return [(group, rung, saving) for _, group, rung, saving in moves]


def _search(choices: dict[Group, LayerChoice], assignment: dict[Group, int], evaluate: _Evaluator,
            target: float, worth: float = 0.0) -> None:
    """Apply the longest prefix of ``_moves`` that keeps the PCC at ``target`` (bisection). The first
    move that breaks it is dropped, with the same layer's later moves, and the search goes on with
    the rest until the moves or the evaluation budget run out, or until what the moves taken and
    left could save together falls under ``worth`` seconds (then no evaluation can change the
    outcome: the caller keeps the most accurate numerics)."""
    for choice in choices.values():
        choice.target = target
    pending = _moves(choices)

    def after(moves: list[tuple[Group, int, float]]) -> dict[Group, int]:
        return {**assignment, **{group: rung for group, rung, _ in moves}}

    def passes(moves: list[tuple[Group, int, float]]) -> bool:
        value = evaluate(after(moves))
        if value >= target:
            evaluate.last_passing = value
        return value >= target

    def saved() -> float:
        return sum(c.seconds[0] - c.seconds[assignment[g]] for g, c in choices.items())

    while pending and not evaluate.exhausted and saved() + sum(m[2] for m in pending) >= worth:
        lo, hi = 0, len(pending)  # pending[:lo] passes; pending[:hi] does not, unless all pass
        if passes(pending):
            lo = hi
        while hi - lo > 1 and not evaluate.exhausted:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if passes(pending[:mid]) else (lo, mid)
        assignment.update(after(pending[:lo]))
        if lo == len(pending) or hi - lo > 1:  # all passed, or the budget ran out mid-bisection
            break
        group, rung, saving = pending[lo]
        choices[group].blocked.append((rung, saving))
        pending = [m for m in pending[lo + 1:] if m[0] != group]
    evaluate.hybrid.set(lambda group: LADDER[assignment[group]])


# -- inputs and outputs ----------------------------------------------------------------------------


def _samples(settings: AutoRecipe, input_shape: tuple[int, ...]) -> torch.Tensor:
    if settings.samples is not None:
        samples = settings.samples
        if tuple(samples.shape[1:]) != tuple(input_shape[1:]):
            raise ValueError(f"auto recipe: samples have shape {list(samples.shape)}, the model input is "
                             f"{list(input_shape)} (any batch size)")
        return samples
    from ttswap.calibration import sample_batch

    if input_shape[1] != 3:
        raise ValueError(f"auto recipe: no default samples for {input_shape[1]}-channel inputs; pass samples=")
    return sample_batch((input_shape[2], input_shape[3]))


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float()]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    raise TypeError(f"auto recipe: cannot compare model outputs of type {type(value).__name__}")


__all__ = ["AutoRecipe", "LADDER", "LayerChoice", "Rung", "Tuning", "tune"]
