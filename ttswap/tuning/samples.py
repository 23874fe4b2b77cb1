"""The inputs the auto recipe tunes on and the ones it holds back to validate what it found.

By default both are varied batches (``ttswap.calibration.varied_batch``: crops at several scales,
flips, synthetic natural-spectrum (1/f) images, photometric augmentations), from different seeds and
different sources: the search tunes on colour photos, and validates on grey natural textures, so that
validation sees inputs unlike the ones tuned on, as a user's inputs will be. Real data from the user's domain is the
best calibration: ``AutoRecipe(samples=...)`` takes it (a quarter, at least one batch, held back
unless ``holdout=`` is given too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttswap.calibration import SAMPLE_IMAGES, TEXTURES, varied_batch

TUNING_SEED, HOLDOUT_SEED = 0, 1


@dataclass(frozen=True)
class SampleSets:
    """What the search judges candidates on (``tuning``) and what validates its result (``holdout``,
    possibly empty). Both in batches of the model's input batch size."""

    tuning: list[torch.Tensor]
    holdout: list[torch.Tensor]
    source: str  # says where they came from, for the recipe's description

    @property
    def counts(self) -> tuple[int, int]:
        return sum(len(b) for b in self.tuning), sum(len(b) for b in self.holdout)


def sample_sets(input_shape: tuple[int, ...], samples: torch.Tensor | None = None,
                holdout: torch.Tensor | None = None, count: int = 8, holdout_count: int = 4) -> SampleSets:
    """The tuning and held-back inputs for a model taking ``input_shape``: the user's (``samples``,
    of which the last quarter, at least one batch, is held back when ``holdout`` is None and there
    are two batches or more), or the default varied batches of ``count`` and ``holdout_count`` images."""
    batch = input_shape[0]
    if samples is None:
        if input_shape[1] != 3:
            raise ValueError(f"auto recipe: no default samples for {input_shape[1]}-channel inputs; pass samples=")
        size = (input_shape[2], input_shape[3])
        tuning = varied_batch(size, _whole(count, batch), seed=TUNING_SEED, photos=SAMPLE_IMAGES)
        held = holdout if holdout is not None else \
            varied_batch(size, _whole(holdout_count, batch), seed=HOLDOUT_SEED, photos=TEXTURES)
        source = "varied default samples (photo crops, 1/f images, augmentations; textures held back)"
    else:
        _check_shape(samples, input_shape, "samples")
        tuning, held, source = samples, holdout, "the samples given"
        if held is None:
            batches = len(samples) // batch
            kept = batches - max(1, batches // 4) if batches >= 2 else batches
            tuning, held = samples[:kept * batch], samples[kept * batch:]
    if held is not None and len(held):
        _check_shape(held, input_shape, "holdout")
    sets = SampleSets(_batches(tuning, batch, "samples"), _batches(held, batch, "holdout") if held is not None else [],
                      source)
    if not sets.tuning:
        raise ValueError(f"auto recipe: need at least {batch} sample(s) (the model's batch size), got {len(tuning)}")
    return sets


def _whole(count: int, batch: int) -> int:
    return max(batch, count // batch * batch)


def _check_shape(samples: torch.Tensor, input_shape: tuple[int, ...], what: str) -> None:
    if tuple(samples.shape[1:]) != tuple(input_shape[1:]):
        raise ValueError(f"auto recipe: {what} have shape {list(samples.shape)}, the model input is "
                         f"{list(input_shape)} (any batch size)")


def _batches(samples: torch.Tensor, batch: int, what: str) -> list[torch.Tensor]:
    """Whole batches only: a converted model runs the batch size it was converted for."""
    return [samples[i:i + batch] for i in range(0, len(samples) - batch + 1, batch)]


__all__ = ["SampleSets", "sample_sets"]
