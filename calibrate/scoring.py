"""Score prompts at every layer, whatever the answer format: one token per option (letters,
verbalizer: :mod:`calibrate.probe`, :mod:`calibrate.steer`) or each option's text as a
continuation (cloze: :mod:`calibrate.cloze`). Jobs, steering and ablations call only these two.
"""

from __future__ import annotations

import numpy as np

from calibrate.models import LoadedModel
from calibrate.probe import ProbeResult, ProbeSettings, run_probe
from calibrate.prompts import PromptSet
from calibrate.steer import Intervention, run_steered


def score(loaded: LoadedModel, prompt_set: PromptSet, settings: ProbeSettings) -> ProbeResult:
    """Every example's option scores and probabilities at every layer (unsteered)."""
    if prompt_set.is_cloze:
        from calibrate.cloze import run_cloze

        return run_cloze(loaded, list(prompt_set.requests), prompt_set.labels, settings,
                         prompt_set.cloze_norm or "none")
    return run_probe(loaded, prompt_set, settings)


def score_steered(loaded: LoadedModel, prompt_set: PromptSet, intervention: Intervention,
                  settings: ProbeSettings, use_cache: bool = True) -> np.ndarray:
    """Option scores [V, N, L+1, K] under each variant of ``intervention``; their softmax over
    the last axis is the option distribution."""
    if prompt_set.is_cloze:
        from calibrate.cloze import run_cloze_steered

        return run_cloze_steered(loaded, list(prompt_set.requests), intervention, settings,
                                 prompt_set.cloze_norm or "none")
    return run_steered(loaded, prompt_set, intervention, settings, use_cache)
