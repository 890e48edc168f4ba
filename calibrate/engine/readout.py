"""How a layer's residual is read as the model's output: the readout interface.

Every per-layer number is a *read* of a residual: the probe, cloze scoring, steering, the nulls
and the ablations all go through one :class:`Readout`. A read has two steps, so a batch read once
serves both outputs:

* :meth:`Readout.prepare` maps residuals ``[..., L, H]`` of the given ``layers`` (one per slice
  of the L axis, in the model's numbering) to the readout's state (float32), e.g. the final norm
  for the logit lens, a per-layer translator then the final norm for a tuned lens;
* :meth:`Readout.option_logits` reads the options' logits from the state; where the readout has
  the whole vocabulary (:attr:`Readout.full_vocabulary`), :meth:`Readout.vocab_logsumexp` its
  normalizer (cloze scoring and the option mass need it).

Reads are differentiable (no inference mode inside), so a gradient fit reads through the same
object. :attr:`Readout.identity` keys caches: two readouts with one identity read alike.
The logit lens (:class:`calibrate.engine.lens.LogitLens`) is the default; other readouts live in
:mod:`calibrate.readouts`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch


class Readout(ABC):
    """Reads residuals of given layers as option logits (and, for a lens, the vocabulary)."""

    name: ClassVar[str]
    full_vocabulary: ClassVar[bool] = True  # reads every token: cloze and the option mass work
    device: torch.device

    @abstractmethod
    def prepare(self, residual: torch.Tensor, layers: Sequence[int]) -> Any:
        """The state of ``residual`` [..., L, H] (slice i of the L axis is layer ``layers[i]``)."""

    @abstractmethod
    def option_logits(self, state: Any, option_ids: torch.Tensor) -> torch.Tensor:
        """Option logits [B, L, K] of a state of [B, L, H] residuals; option_ids [B, K], -1 for
        no option (-inf there)."""

    def vocab_logsumexp(self, state: Any) -> torch.Tensor:
        """log Σ_v exp(logit_v) over the whole vocabulary: [..., L] float64."""
        raise NotImplementedError(f"the {self.name} readout does not read the vocabulary")

    @property
    def identity(self) -> str:
        """What decides the reads (for cache keys); the same for readouts that read alike."""
        return self.name

    def summary(self) -> dict[str, Any]:
        """What metrics.json records about the readout (what it was fit on, where it applies)."""
        return {"name": self.name}

    def read_layers(self, residual: torch.Tensor, layers: Sequence[int],
                    option_ids: torch.Tensor) -> torch.Tensor:
        """``option_logits(prepare(residual, layers), option_ids)`` in one call."""
        return self.option_logits(self.prepare(residual, layers), option_ids)
