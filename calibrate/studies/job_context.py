"""What every study is given: the job context (spec, model, prompts) and its shared services.

A study asks the context for what it needs — scored passes through the result cache, the
per-layer metrics of a result, the seeded calibration/evaluation split, steered passes — and
never calls back into the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibrate.config.spec import JobSpec
from calibrate.core.bootstrap import bootstrap_layer_ci
from calibrate.core.direction import split_indices
from calibrate.core.metrics import MetricSettings, layer_table
from calibrate.core.option_scores import option_probabilities
from calibrate.core.paired import add_paired_columns, multiple_comparisons
from calibrate.engine import cache as probe_cache
from calibrate.engine.edits import Intervention, check_steering
from calibrate.engine.probe import ProbeResult, ProbeSettings
from calibrate.engine.readout import Readout
from calibrate.engine.scoring import score, score_steered
from calibrate.model.load import LoadedModel
from calibrate.readouts import ReadoutSource, build_readout
from calibrate.tasks.prompts import PromptSet
from calibrate.tasks.quality import warn_straddling


@dataclass
class ProbeReport:
    """What a probe of one model on one set of prompts produced: the per-layer table, the raw
    result and the prompts it covers."""

    table: pd.DataFrame  # one row per layer
    result: ProbeResult
    prompt_set: PromptSet
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        """Metrics of the last layer (the model's own prediction)."""
        return {k: float(v) for k, v in self.table.iloc[-1].items() if k != "layer"}


def measure(result: ProbeResult, metrics: MetricSettings) -> pd.DataFrame:
    """The per-layer metrics table of a probe result (plus the mean option mass per layer and,
    with ``metrics.bootstrap`` > 0, bootstrap intervals of accuracy and of the true ECE, see
    :func:`calibrate.core.bootstrap.bootstrap_layer_ci`)."""
    m = metrics
    table = layer_table(result.probs, result.labels, n_bins=m.n_bins, binning=m.binning,
                        extra_bins=m.extra_bins)
    for metric in ("accuracy", "ece") if m.bootstrap else ():
        ci = bootstrap_layer_ci(result.probs, result.labels, metric, n_boot=m.bootstrap,
                                alpha=m.alpha, seed=m.seed, n_bins=m.n_bins, binning=m.binning,
                                ece_margin=m.ece_margin)
        table[f"{metric}_lo"], table[f"{metric}_hi"] = ci["lo"].to_numpy(), ci["hi"].to_numpy()
    if result.option_mass is not None:
        mass = np.full(len(table), np.nan)
        mass[-result.option_mass.shape[1]:] = result.option_mass.mean(axis=0)
        table["option_mass"] = mass
    return table


def make_report(result: ProbeResult, prompt_set: PromptSet, metrics: MetricSettings) -> ProbeReport:
    """Measure a result and keep what the job records beside it."""
    info = {"adds_bos": prompt_set.adds_bos, "option_strings": prompt_set.option_strings,
            "padding_efficiency": result.padding_efficiency}
    return ProbeReport(measure(result, metrics), result, prompt_set, info)


def weights_key(loaded: LoadedModel) -> str:
    """The weights as loaded, for cache keys: fingerprint, dtype and device (never a name)."""
    ident = loaded.identity()
    return f"{ident['fingerprint']}|{ident['dtype']}|{ident['device']}"


def cached_probe(loaded: LoadedModel, prompt_set: PromptSet, probe: ProbeSettings,
                 keep_layers: Sequence[int] = (), cache_dir: str | Path | None = None,
                 readout: Readout | None = None) -> ProbeResult:
    """The prompt set's scoring through the in-process and on-disk result cache, keyed by the
    weights as loaded, the prompts and the readout's identity (default: the logit lens)."""
    settings = probe.keeping(keep_layers)
    if getattr(loaded, "edits", None):  # hooks edit the function the weights compute: no cache
        return score(loaded, prompt_set, settings, readout)
    identity = "logit" if readout is None else readout.identity
    key = probe_cache.probe_key(weights_key(loaded), prompt_set, settings, identity)
    result = probe_cache.load(key, cache_dir)
    if result is None:
        result = score(loaded, prompt_set, settings, readout)
        probe_cache.store(key, result, cache_dir)
    return result


@dataclass
class JobContext:
    """One job's spec, model and prompts, and the services every study shares."""

    spec: JobSpec
    loaded: LoadedModel
    prompt_set: PromptSet
    _readout: Readout | None = field(default=None, repr=False)
    _split_warned: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def readout(self) -> Readout:
        """How every layer is read (the ``lens`` group), built once per job; a fitted readout
        trains on the calibration split's prompts only."""
        if self._readout is None:
            calibration, split = None, None
            if self.spec.uses_split:
                cal = self.split()[0]
                calibration = self.prompt_set.subset(cal)
                direction = self.spec.direction
                split = {"split": "calibration", "dataset": self.spec.dataset.name,
                         "rows": int(len(cal)), "of_rows": len(self.prompt_set.prompts),
                         "calibration_fraction": direction.calibration_fraction,
                         "split_seed": direction.seed}
            self._readout = build_readout(self.spec.lens, ReadoutSource(
                self.loaded, calibration, self.spec.cache_dir, self.spec.seed, split))
        return self._readout

    @property
    def num_layers(self) -> int:
        """Layers read by the lens: the embeddings and every block's output."""
        return self.loaded.adapter.num_blocks + 1

    @property
    def settings(self) -> ProbeSettings:
        """Batching and outputs of a scoring pass (no residuals kept)."""
        return self.spec.probe

    def probe(self, prompt_set: PromptSet | None = None, keep: Sequence[int] = ()) -> ProbeResult:
        """Unsteered scores of ``prompt_set`` (default: the job's), with the residuals of the
        ``keep`` layers, through the result cache."""
        return cached_probe(self.loaded, prompt_set or self.prompt_set, self.spec.probe, keep,
                            self.spec.cache_dir, self.readout)

    def measure(self, result: ProbeResult) -> pd.DataFrame:
        """The per-layer metrics table of a result, with the job's metric settings."""
        return measure(result, self.spec.metrics)

    def report(self, result: ProbeResult, prompt_set: PromptSet | None = None) -> ProbeReport:
        """A measured report of ``result`` over ``prompt_set`` (default: the job's)."""
        return make_report(result, prompt_set or self.prompt_set, self.spec.metrics)

    def split(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The seeded calibration and evaluation indices (one split for every arm of a study)."""
        size = len(self.prompt_set.prompts) if n is None else n
        cal, evaluation = split_indices(size, self.spec.direction.calibration_fraction,
                                        self.spec.direction.seed)
        checks = self.prompt_set.data_checks
        if n is None and checks is not None and not self._split_warned:
            self._split_warned = True  # one split for every arm: said once
            warn_straddling(checks.duplicate_groups, cal, evaluation)
        return cal, evaluation

    def reads_last_layer(self, prompt_set: PromptSet, intervention: Intervention) -> bool:
        """Whether ``intervention`` only changes the lens read of the last layer's residual: an
        edit of the last position at the last layer, one token per option."""
        return (not prompt_set.is_cloze and intervention.position == "last"
                and tuple(intervention.layers) == (self.num_layers - 1,))

    def steered(self, prompt_set: PromptSet, intervention: Intervention,
                base: ProbeResult | None = None) -> np.ndarray:
        """Option scores [V, N, L+1, K] of ``prompt_set`` under each variant of ``intervention``.

        With ``base``, the unsteered result of these prompts keeping the last layer's residual, an
        edit of the last position at the last layer with one token per option needs no forward
        pass: only the lens read of that residual changes.
        """
        last = self.num_layers - 1
        if base is not None and self.reads_last_layer(prompt_set, intervention) \
                and last in base.residuals:
            from calibrate.engine.last_layer import last_layer_steered

            return last_layer_steered(self.loaded, base.option_logits, base.residuals[last],
                                      prompt_set.option_ids, intervention, self.readout)
        return score_steered(self.loaded, prompt_set, intervention, self.settings,
                             self.spec.intervention.use_cache, self.readout)

    def edit_layers(self) -> list[int]:
        """``intervention.layers`` resolved (default: the last layer) and checked."""
        icfg = self.spec.intervention
        layers = list(icfg.layers or [self.num_layers - 1])
        return check_steering(layers, self.num_layers, icfg.position, icfg.eta_scale)

    def paired(self, table: pd.DataFrame, logits: np.ndarray, labels: np.ndarray, column: str,
               first_layer: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Paired bootstrap intervals of every arm's deltas against the first (η = 0, or no
        ablation), with ``metrics.bootstrap`` replicates; the cells that can differ (the other
        arms at layers >= ``first_layer``, the lowest edited layer) with
        ``metrics.paired_bootstrap`` replicates, p-values and their ``metrics.correction``; the
        multiple-comparisons note."""
        m = self.spec.metrics
        if not m.bootstrap:
            return table, {}
        table = add_paired_columns(table, option_probabilities(logits), labels, column, 0,
                                   m.bootstrap, m.alpha, m.seed, m.n_bins, m.binning,
                                   first_layer, m.paired_bootstrap, m.correction)
        return table, {"comparisons": multiple_comparisons(table, m.alpha, m.correction,
                                                           m.paired_bootstrap)}
