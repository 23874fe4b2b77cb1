"""The "auto" recipe: per-layer shard layout, act_block_h and numerics, chosen for one model.

``ttswap.convert(model, "auto", input_shape=...)`` (or ``convert(model, AutoRecipe(...))``) tunes a
recipe for ``model`` before converting it:

1. **Layouts.** The model is converted once at the most accurate numerics with ttnn's default
   sharding and one forward pass is observed (``ttswap.tuning.recording.observe``). For every layer
   that runs convolutions, each shard layout (height, block, width) and ``act_block_h`` is priced
   with the Wormhole cost model (``ttswap.tuning.pricing.conv2d_cost``, input reshards included) and
   checked against the per-core L1 budget (``ttswap.backends.l1.estimate_conv_l1`` plus the L1 other
   live tensors held at that point); the fastest that fits wins.
2. **Numerics.** Math fidelity and weight dtype decide accuracy (LoFi reads 5 bits of each weight)
   far more than they decide time (most layers at batch 1 are bound by launch or data movement, not
   the matrix engine). Each layer gets a rung of ``LADDER``, most accurate first, and every layer's
   time on every rung is estimated. One forward pass measures what each layer adds to the error on
   its own per rung. Steps down the ladder are ordered by time saved per squared error added
   (independent errors add in quadrature), and the search applies the longest prefix of that order
   that keeps **every sample's** PCC (worst output) against the torch fp32 model at the search's aim,
   each sample's aim set by its own PCC at the most accurate rung (errors scale with an input's
   sensitivity), found by bisection with the real converted model. The step that breaks
   it is skipped (the layer's note says so) and the search goes on with the rest, within
   ``max_evaluations`` evaluations. Steps saving under ``MIN_GAIN_S`` are not taken; nor any, when
   together they would save under ``min_numerics_gain`` of the model's device time.
3. **Validation.** The samples held back from the search (different images, another seed) must pass
   too: if they do not, the moves taken are undone, the least valuable (the cheapest numerics) first,
   by bisection, until they do.

4. **The target backend.** Converting for ttnn (a device, or mock mode), the tuned recipe runs one
   forward pass there first (``fit_on``): a layer ttnn finds short of L1, which the estimate cannot
   foresee when the free L1 is fragmented, gives up fp32 accumulation, then takes its next best layout.

**The bar** is PCC >= ``pcc_target`` (0.99) against torch fp32, or, where the most accurate rung
leaves less room than that (below 0.9933), at most ``relative_bar`` (1.5) times its error, ``1 - PCC <=
1.5 * (1 - PCC_accurate)``: a random-weight network whose outputs amplify any rounding may not reach
0.99 in bfloat16 at all. The search spends at most ``aim`` (40%) of the error the bar allows beyond the most
accurate rung on its tuning samples, and validation at most ``holdout_aim`` (60%) on the held-back
ones (other sources: grey textures where the search tuned on colour photos), leaving the rest as
margin for inputs neither saw. The bfloat8_b guard (``Recipe.bfp8_guard``) still
keeps bf16 weights where a channel would lose too much.

The result is an ordinary ``Recipe`` with one rule per device layer, whose note (shown in the
conversion report) says what was chosen and why: estimated time and bound, cores, L1 per core, and the
numerics decision; its description gives the bar, the PCC on the tuning and held-back samples and the
estimated device time.
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
from ttswap.converter import ConversionError, convert
from ttswap.tuning.hardware import N150, WormholeN150
from ttswap.tuning.pricing import conv2d_cost, conv_grid
from ttswap.tuning.recording import OpCall, observe, top_level_layers
from ttswap.tuning.report import cost_report
from ttswap.tuning.samples import sample_sets
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
    undone: int | None = None  # the rung the search gave it, when validation on held-back samples undid it
    on_device: str = ""  # what running on the target backend changed, and why

    @property
    def numerics_reason(self) -> str:
        if self.on_device:
            return self.on_device
        if self.kept_because:
            return f"kept {LADDER[0]}: {self.kept_because}"
        if self.undone is not None:
            return (f"kept {LADDER[self.rung]}: {LADDER[self.undone]} ({self._error(self.undone)} error here) passed "
                    f"the tuning samples, but the held-back samples needed the moves after it undone")
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
    pcc: float  # worst sample's, of the chosen configuration, on the tuning samples (last measured)
    top_pcc: float  # worst sample's with every layer on the top rung, on the tuning samples
    target: float  # what the search aimed at on the tuning samples
    bar: float  # what the result must keep: pcc_target, or relative to top_pcc
    holdout_pcc: float  # worst held-back sample's, of the result (nan without held-back samples)
    holdout_top_pcc: float
    holdout_target: float
    evaluations: int  # on the tuning samples
    validations: int  # on the held-back samples
    undone: int  # moves validation undid
    seconds: float  # tuning wall time
    phases: dict[str, float] = field(default_factory=dict)  # wall time by phase


@dataclass(eq=False)
class AutoRecipe(Recipe):
    """A recipe that tunes itself for each model it converts (see the module docstring).

    ``samples`` are the inputs the search judges candidates on, by the worst sample (default: a varied
    batch of scikit-image photo crops, synthetic natural-spectrum images and augmentations, at the input
    size, ImageNet-normalised). **Real inputs from your domain, preprocessed as your model expects, are
    the best calibration**: pass a few dozen. ``holdout`` are the inputs that validate the result
    (default: another varied batch, or the last quarter of ``samples`` when those are given).
    ``max_evaluations`` bounds the search's evaluations on the samples."""

    name: str = "auto"
    bfp8_guard: float | None = 0.05
    source: str = "auto"
    pcc_target: float = 0.99
    relative_bar: float = 1.5  # where the top rung misses pcc_target: 1 - PCC <= relative_bar * (1 - PCC_top)
    aim: float = 0.4  # share of the error budget the search may spend on the tuning samples
    holdout_aim: float = 0.6  # ... and the result on the held-back samples
    samples: torch.Tensor | None = None
    holdout: torch.Tensor | None = None
    sample_count: int = 8  # default samples: tuning images, and held-back ones
    holdout_count: int = 4
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

    def bar(self, top_pcc: float) -> float:
        """The PCC a result must keep when the most accurate numerics reach ``top_pcc``: ``pcc_target``,
        or, where that leaves less room, at most ``relative_bar`` times their error (the lower of the
        two, so that the room never vanishes as ``top_pcc`` nears the target from above)."""
        return min(self.pcc_target, 1.0 - self.relative_bar * (1.0 - top_pcc))

    def aim_at(self, top_pcc: float, share: float) -> float:
        """The PCC that spends ``share`` of the error the bar allows beyond ``top_pcc``."""
        return top_pcc - share * (top_pcc - self.bar(top_pcc))


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
    clock = _Phases()
    sets = sample_sets(input_shape, settings.samples, settings.holdout, settings.sample_count, settings.holdout_count)
    model = model.eval()

    top = LADDER[0]
    base = Recipe(name="auto", defaults=OpConfig(fidelity=top.fidelity, weight_dtype=top.weight_dtype,
                                                 fp32_acc=top.fp32_acc),
                  bfp8_guard=settings.bfp8_guard, source="auto")
    log.info("auto recipe: observing %s at %s", type(model).__name__, list(input_shape))
    baseline, calls = _observe_baseline(model, base, input_shape)
    backend = EmulatedBackend()  # one for both variants, so that observing the mix sees every layer's ops
    choices = _choose_layouts(baseline, calls, settings.hw)
    clock.lap("layouts")
    log.info("auto recipe: layouts chosen for %d layer(s); pricing their numerics", len(choices))
    hybrid, observed = _build_variants(model, base, choices, input_shape, backend)
    _price_rungs(hybrid, observed, choices, settings.hw)
    clock.lap("variants")

    evaluate = _Evaluator(hybrid, model, sets.tuning, settings.max_evaluations, "tuning")
    assignment = {group: 0 for group in choices}
    top_pcc = evaluate.last_passing = evaluate(assignment)
    bar, target = settings.bar(top_pcc), settings.aim_at(top_pcc, settings.aim)  # the worst sample's
    # each sample is held to the bar its own most accurate PCC sets: errors scale with an input's
    # sensitivity, so a sample far above the worst must not lose more than its share either
    targets = [settings.aim_at(evaluate.per_sample[i], settings.aim) for i in range(len(sets.tuning))]
    if bar == settings.pcc_target:
        goal = f"PCC >= {bar:g} on every sample"
    else:
        goal = (f"PCC >= {bar:.4f} on every sample: the most accurate numerics reach {top_pcc:.4f}, so at most "
                f"{settings.relative_bar:g}x their error")
    log.info("auto recipe: top rung worst-sample PCC %.4f; %s; the search aims at %.4f", top_pcc, goal, target)
    errors = hybrid.local_errors(sets.tuning[0])
    for choice in choices.values():  # a group's modules add independent errors: in quadrature
        choice.errors = [math.hypot(*column) for column in zip(*(errors[key] for key in choice.keys))]
    clock.lap("local errors")
    top_total = sum(c.seconds[0] for c in choices.values())
    worth = settings.min_numerics_gain * top_total
    taken = _search(choices, assignment, evaluate, targets, worth)
    final_pcc = evaluate.last_passing
    clock.lap("search")

    check = _Evaluator(hybrid, model, sets.holdout, len(taken).bit_length() + 2, "held-back")
    saving = top_total - sum(c.seconds[assignment[g]] for g, c in choices.items())
    held = (math.nan, math.nan, math.nan, 0)
    if sets.holdout and saving >= worth:
        held = _validate(choices, assignment, taken, check, settings)
    elif sets.holdout:  # the gain check below keeps the top rung: measure that alone
        value = check({group: 0 for group in choices})
        held = (value, settings.aim_at(value, settings.holdout_aim), value, 0)
    holdout_top, holdout_target, holdout_pcc, undone = held
    if undone:
        final_pcc = math.nan  # not measured on the tuning samples after the undo; the held-back figure says it
    clock.lap("validation")

    total = sum(c.seconds[assignment[g]] for g, c in choices.items())
    if top_total - total < worth:
        kept = (f"the cheaper numerics the bar allows would save under {settings.min_numerics_gain:.0%} "
                f"of the device time, too little to be worth any accuracy")
        log.info("auto recipe: %s; every layer keeps %s", kept, top)
        assignment = {group: 0 for group in choices}
        final_pcc, holdout_pcc, total = top_pcc, holdout_top, top_total
        goal += f"; {kept}"
        for choice in choices.values():
            choice.kept_because, choice.blocked, choice.undone = kept, [], None
    for group, choice in choices.items():
        choice.rung = assignment[group]
        choice.target = target
    hybrid.set(lambda group: LADDER[assignment[group]])
    recipe = _with_rules(base, choices, notes=True)
    tuned, held_n = sets.counts
    measured = f"worst-sample PCC {final_pcc:.4f} on {tuned} tuning sample(s)" if not math.isnan(final_pcc) else ""
    if held_n:
        measured += ("; " if measured else "") + (f"{holdout_pcc:.4f} on {held_n} held-back sample(s)"
                                                  + (f" after undoing {undone} move(s)" if undone else ""))
    recipe.description = (f"auto-tuned for {type(model).__name__} at {list(input_shape)} on {sets.source}: {goal}; "
                          f"{measured} ({evaluate.count} + {check.count} evaluations); estimated device time "
                          f"{total * 1e3:.3f} ms against {top_total * 1e3:.3f} ms with every layer at {top}")
    log.info("auto recipe: %s", recipe.description)
    return Tuning(recipe, choices, final_pcc, top_pcc, target, bar, holdout_pcc, holdout_top, holdout_target,
                  evaluate.count, check.count, undone, time.perf_counter() - start, clock.seconds)


class _Phases:
    """Wall time per tuning phase, for the benchmark's tuning-time column."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


# -- conversions ------------------------------------------------------------------------------------


def _convert(model: nn.Module, recipe: Recipe, input_shape: tuple[int, ...], backend: Backend):
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
    local: dict[int, MemorySpec] = {}  # this layer's outputs; read over ``placed`` (no copy: linear in layers)
    seconds, peak = 0.0, 0
    for j in convs:
        call = calls[j]
        x: DeviceTensor = call.args["x"]
        source = call.sources.get("x")
        memory = local.get(source, placed.get(source)) if isinstance(source, int) else None
        if memory is not None:
            x = dataclasses.replace(x, memory=memory)
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
                    m.reconfigure(rung.apply(cfg))

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
    """The worst sample's PCC against torch fp32 (over every output) of the hybrid under an assignment
    of rungs; ``per_sample`` keeps each sample's. With ``floors`` (one per sample), ``passed`` says
    whether every sample kept its own, and the evaluation stops at the first that did not: candidates
    that fail are cheap, and the samples that failed last run first."""

    def __init__(self, hybrid: _Hybrid, model: nn.Module, batches: list[torch.Tensor], budget: int, name: str):
        self.hybrid, self.batches, self.budget, self.name = hybrid, list(batches), budget, name
        with torch.no_grad():
            self.reference = [_outputs(model(b)) for b in self.batches]
        self.order = list(range(len(self.batches)))
        self.count = 0
        self.last_passing = float("nan")
        self.per_sample: dict[int, float] = {}
        self.passed = True

    @property
    def exhausted(self) -> bool:
        return self.count >= self.budget

    def __call__(self, assignment: dict[Group, int], floors: Sequence[float] | None = None) -> float:
        self.count += 1
        self.hybrid.set(lambda group: LADDER[assignment.get(group, 0)])
        worst, self.per_sample, self.passed = math.inf, {}, True
        for position, i in enumerate(self.order):
            got = _outputs(self.hybrid.model(self.batches[i]))
            value = min(pcc(g[k], r[k]) for g, r in zip(got, self.reference[i]) for k in range(len(r)))
            worst, self.per_sample[i] = min(worst, value), value
            if floors is not None and value < floors[i]:
                self.passed = False
                self.order.insert(0, self.order.pop(position))  # the most sensitive sample runs first next time
                break
        lowered = sum(1 for rung in assignment.values() if rung)
        log.info("auto recipe: %s evaluation %d of at most %d: %d layer(s) below the top rung, worst-sample PCC %.4f",
                 self.name, self.count, self.budget, lowered, worst)
        return worst


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


Move = tuple[Group, int, float]  # (layer group, rung, seconds saved)


def _search(choices: dict[Group, LayerChoice], assignment: dict[Group, int], evaluate: _Evaluator,
            targets: Sequence[float], worth: float = 0.0) -> list[Move]:
    """Apply the longest prefix of ``_moves`` that keeps every sample's PCC at its target (bisection). The first move that breaks it is dropped, with the same layer's later moves, and
    the search goes on with the rest until the moves or the evaluation budget run out, or until what
    the moves taken and left could save together falls under ``worth`` seconds (then no evaluation can
    change the outcome: the caller keeps the most accurate numerics). Returns the moves taken, in the
    order they were taken (most valuable first)."""
    pending = _moves(choices)
    taken: list[Move] = []

    def after(moves: list[Move]) -> dict[Group, int]:
        return {**assignment, **{group: rung for group, rung, _ in moves}}

    def passes(moves: list[Move]) -> bool:
        value = evaluate(after(moves), targets)
        if evaluate.passed:
            evaluate.last_passing = value
        return evaluate.passed

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
        taken += pending[:lo]
        if lo == len(pending) or hi - lo > 1:  # all passed, or the budget ran out mid-bisection
            break
        group, rung, saving = pending[lo]
        choices[group].blocked.append((rung, saving))
        pending = [m for m in pending[lo + 1:] if m[0] != group]
    return taken


def _validate(choices: dict[Group, LayerChoice], assignment: dict[Group, int], taken: list[Move],
              check: _Evaluator, settings: AutoRecipe) -> tuple[float, float, float, int]:
    """Check the search's result on the held-back samples, and undo its moves, the last taken (the
    least time saved per error added, the cheapest numerics) first, until they pass: the longest
    prefix of ``taken`` that passes, by bisection. Returns (top rung's PCC there, the aim there, the
    result's PCC there, moves undone)."""
    top = {group: 0 for group in choices}
    top_pcc = check(top)
    target = settings.aim_at(top_pcc, settings.holdout_aim)  # the worst sample's; each has its own
    targets = [settings.aim_at(check.per_sample[i], settings.holdout_aim) for i in range(len(check.batches))]

    def applied(k: int) -> dict[Group, int]:
        return {**top, **{group: rung for group, rung, _ in taken[:k]}}

    if not taken:
        return top_pcc, target, top_pcc, 0
    value = check(applied(len(taken)), targets)
    if check.passed:
        return top_pcc, target, value, 0
    lo, hi, passing = 0, len(taken), top_pcc  # taken[:lo] passes, taken[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        value = check(applied(mid), targets)
        if check.passed:
            lo, passing = mid, value
        else:
            hi = mid
    kept = applied(lo)
    for group, rung, _ in taken[lo:]:
        if kept[group] != assignment[group] and choices[group].undone is None:
            choices[group].undone = assignment[group]
    assignment.update(kept)
    log.info("auto recipe: held-back samples: %d of %d move(s) undone, worst-sample PCC %.4f (aim %.4f)",
             len(taken) - lo, len(taken), passing, target)
    return top_pcc, target, passing, len(taken) - lo


# -- inputs and outputs ----------------------------------------------------------------------------


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float()]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    raise TypeError(f"auto recipe: cannot compare model outputs of type {type(value).__name__}")


__all__ = ["AutoRecipe", "LADDER", "LayerChoice", "Rung", "Tuning", "fit_on", "tune"]
