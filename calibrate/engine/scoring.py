"""How a prompt set's options are scored at every layer: :func:`scoring_of` a prompt set.

:class:`SingleToken` reads one token per option at the last prompt position (letters,
verbalizer: :mod:`calibrate.engine.probe`, :mod:`calibrate.engine.steer`); :class:`Cloze`
scores each option's text as a continuation (:mod:`calibrate.engine.cloze`). The answer format
is decided once, when the prompts are built (a cloze prompt set carries its continuations);
everything downstream asks :func:`scoring_of`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibrate.engine.edits import Intervention
from calibrate.engine.probe import ProbeResult, ProbeSettings, run_probe
from calibrate.engine.readout import Readout
from calibrate.engine.steer import run_steered
from calibrate.model.load import LoadedModel


class SingleToken:
    """One token per option, read at the last prompt position."""

    name = "single_token"

    def score(self, loaded: LoadedModel, prompt_set: Any, settings: ProbeSettings,
              readout: Readout | None = None) -> ProbeResult:
        """Every example's option scores and probabilities at every layer (unsteered), read
        through ``readout`` (default: the logit lens)."""
        return run_probe(loaded, prompt_set, settings, readout)

    def score_steered(self, loaded: LoadedModel, prompt_set: Any, intervention: Intervention,
                      settings: ProbeSettings, use_cache: bool = True,
                      readout: Readout | None = None) -> np.ndarray:
        """Option scores [V, N, L+1, K] under each variant of ``intervention``."""
        return run_steered(loaded, prompt_set, intervention, settings, use_cache, readout)

    def key_fields(self, prompt_set: Any) -> dict[str, Any]:
        """What beyond prompts, option tokens and labels decides the scores (for cache keys)."""
        return {}

    def summary_fields(self, prompt_set: Any) -> dict[str, Any]:
        """What metrics.json records about the scoring."""
        return {}


class Cloze(SingleToken):
    """Each option's text as a continuation, its log-likelihood read through the lens."""

    name = "cloze"

    def score(self, loaded: LoadedModel, prompt_set: Any, settings: ProbeSettings,
              readout: Readout | None = None) -> ProbeResult:
        from calibrate.engine.cloze import run_cloze

        return run_cloze(loaded, list(prompt_set.requests), prompt_set.labels, settings,
                         prompt_set.cloze_norm or "none", groups=prompt_set.groups,
                         readout=readout)

    def score_steered(self, loaded: LoadedModel, prompt_set: Any, intervention: Intervention,
                      settings: ProbeSettings, use_cache: bool = True,
                      readout: Readout | None = None) -> np.ndarray:
        from calibrate.engine.cloze import run_cloze_steered

        return run_cloze_steered(loaded, list(prompt_set.requests), intervention, settings,
                                 prompt_set.cloze_norm or "none", use_cache, prompt_set.groups,
                                 readout)

    def key_fields(self, prompt_set: Any) -> dict[str, Any]:
        from calibrate.tasks.continuations import requests_digest

        return {"cloze": requests_digest(prompt_set.requests), "cloze_norm": prompt_set.cloze_norm}

    def summary_fields(self, prompt_set: Any) -> dict[str, Any]:
        return {"cloze_norm": prompt_set.cloze_norm}


SINGLE_TOKEN, CLOZE = SingleToken(), Cloze()


def scoring_of(prompt_set: Any) -> SingleToken:
    """How ``prompt_set`` is scored: its continuations (cloze) or one token per option."""
    return CLOZE if prompt_set.is_cloze else SINGLE_TOKEN


def score(loaded: LoadedModel, prompt_set: Any, settings: ProbeSettings,
          readout: Readout | None = None) -> ProbeResult:
    """``prompt_set.scoring.score``: option scores and probabilities at every layer."""
    return scoring_of(prompt_set).score(loaded, prompt_set, settings, readout)


def score_steered(loaded: LoadedModel, prompt_set: Any, intervention: Intervention,
                  settings: ProbeSettings, use_cache: bool = True,
                  readout: Readout | None = None) -> np.ndarray:
    """``prompt_set.scoring.score_steered``: scores [V, N, L+1, K] under each variant."""
    return scoring_of(prompt_set).score_steered(loaded, prompt_set, intervention, settings,
                                                use_cache, readout)
