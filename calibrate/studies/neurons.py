"""``intervention=neurons``: confidence-regulation neurons, related to ĉ and ablated.

After Stolfo et al. (NeurIPS 2024), *Confidence Regulation Neurons in Language Models*. For every
MLP neuron of the last ``intervention.blocks`` blocks:

1. **From the weights alone** (:mod:`calibrate.core.neuron_stats`): the output weight's norm,
   its fraction in U_k (the unembedding's bottom-k left singular subspace, k from the
   ``nullspace`` group as in ``intervention=nullspace``) and the variance over the vocabulary
   of its direct logit effect; each as a percentile among all those neurons. The candidates are
   ranked by the norm they write into U_k; an *entropy-neuron candidate* has a norm at or above
   ``intervention.norm_quantile`` of all neurons and at least ``intervention.null_fraction`` of
   its squared norm in U_k. *Token-frequency candidates*: the neurons whose direct logit effect
   correlates most (in absolute value) with log unigram frequency, estimated from the token
   counts of the job's own prompts (tokenizers ship no training counts).
2. **ĉ** (fit as every study fits it, ``direction``): its cosine with each neuron's output
   weight, and the share of its squared norm in the span of the top ``intervention.top_k``
   candidates against the same share for ``intervention.span_draws`` random sets of neurons of
   matched norm (one-sided p-value).
3. **Ablation** at the scored positions, activation → its calibration-split mean over the same
   kind of positions: with one token per option (letters, verbalizer) the last prompt
   position; with cloze scoring every position whose next-token prediction scores a
   continuation token (the context's last token and each continuation's tokens but the last),
   the mean taken over every scored term (:mod:`calibrate.engine.cloze_neurons`). Arms: each
   top candidate, the top set and the token-frequency set (the ``intervention.frequency_top``
   candidates together); per layer from the block up, the total effect (the model's own
   forward computation) and the direct effect (Δ through the final norm with its scale held
   fixed, and the unembedding), with paired bootstrap intervals of ΔECE, ΔMCE, Δconfidence,
   Δentropy and Δaccuracy (evaluation split), and at the last layer ``intervention.n_null`` draws
   of random neurons of matched norm (same block, among the ``intervention.null_pool``
   non-candidates nearest in norm, their change scaled by the norm ratio) with two-sided
   p-values, for each candidate and each set. Beside them, at the last layer: ĉ's own component
   mean-ablated at the same positions, and temperature scaling fit on the calibration split.

One pass over the prompts (:mod:`calibrate.engine.neuron_ablation`,
:mod:`calibrate.engine.cloze_neurons`) is the job's probe, captures the activations and runs
the ablations: in the last block none needs a forward pass, below it only the blocks above run,
on the key/value cache. Outputs: ``neurons.csv`` (every neuron of the blocks), ``neurons.json``,
``neuron_ablation.csv``, ``neurons.png``, ``neuron_ablation.png``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from calibrate import values
from calibrate.core import neuron_stats as ns
from calibrate.core.direction import check_layers, residual_layers_for
from calibrate.core.posthoc import fit_temperature
from calibrate.directions import get_method
from calibrate.directions.fit import obtain_direction
from calibrate.engine.cloze_neurons import cloze_final_edits, final_term_mean
from calibrate.engine.edits import InterventionSettings
from calibrate.engine.neuron_ablation import (
    NeuronArms,
    last_layer_edits,
    neuron_pass,
    output_weights,
)
from calibrate.engine.probe import ProbeResult
from calibrate.errors import ConfigError
from calibrate.io import results
from calibrate.io.nullspace_cache import cached_null_space
from calibrate.io.track import Tracker
from calibrate.model.adapters import final_norm_affine
from calibrate.model.assets import cache_root
from calibrate.model.load import LoadedModel
from calibrate.studies.job_context import JobContext
from calibrate.studies.study import Study, StudyResult, register

NEURONS_FILE = "neurons.csv"
NEURONS_JSON = "neurons.json"
ABLATION_FILE = "neuron_ablation.csv"
FILES = (NEURONS_FILE, NEURONS_JSON, ABLATION_FILE, "neurons.png", "neuron_ablation.png")
SET_ARM, C_HAT_ARM, TEMPERATURE_ARM = "top_set", "c_hat", "temperature"
FREQUENCY_ARM = "frequency_set"


@dataclass
class NeuronSettings(InterventionSettings):
    """``intervention=neurons``: which neurons, the candidates' thresholds, the nulls."""

    name: str = "neurons"
    blocks: int = 1  # the MLP neurons of the last `blocks` blocks
    top_k: int = 8  # candidates ablated one by one and together (and ĉ's span)
    norm_quantile: float = 0.99  # entropy candidate: norm at or above this quantile of all neurons
    null_fraction: float = 0.5  # ... and at least this share of its squared norm in U_k
    frequency_top: int = 8  # token-frequency candidates reported
    null_pool: int = 32  # matched-norm random neurons: among the pool nearest in norm (same block)
    n_null: int = 100  # random matched neurons (sets) ablated like the candidates (0: none)
    span_draws: int = 1000  # random matched sets for ĉ's share in the candidates' span

    def __post_init__(self) -> None:
        super().__post_init__()
        values.integer("intervention.blocks", self.blocks, 1)
        values.integer("intervention.top_k", self.top_k, 1)
        values.number("intervention.norm_quantile", self.norm_quantile, lambda q: 0 <= q <= 1,
                      "a number in [0, 1]")
        values.number("intervention.null_fraction", self.null_fraction, lambda f: 0 <= f <= 1,
                      "a number in [0, 1]")
        values.integer("intervention.frequency_top", self.frequency_top, 0)
        values.integer("intervention.null_pool", self.null_pool, 1)
        if self.null_pool < self.top_k:
            raise ConfigError(f"intervention.null_pool={self.null_pool}; accepted: an integer >= "
                              f"intervention.top_k ({self.top_k}), so every draw of matched "
                              "neurons can be distinct")
        values.integer("intervention.n_null", self.n_null, 0)
        values.integer("intervention.span_draws", self.span_draws, 0)


# --- candidates from the weights ---------------------------------------------------------------


@dataclass
class Candidates:
    """Every neuron of the chosen blocks (``table``, one row each, ranked) and their output
    weights [n, H] (float64)."""

    table: pd.DataFrame
    weights: np.ndarray
    top: np.ndarray  # row indices of the top_k candidates, best first
    k: int

    def label(self, row: int) -> str:
        return f"b{int(self.table['block'].iloc[row])}_n{int(self.table['neuron'].iloc[row])}"


def find_candidates(loaded: LoadedModel, blocks: list[int], k: int, cache_dir: Path,
                    settings: NeuronSettings, counts: np.ndarray | None = None) -> Candidates:
    """The weight statistics, reference percentiles, ranking and flags of every neuron of
    ``blocks``; with token ``counts`` [vocab], the correlation of each neuron's direct logit
    effect with log frequency over the tokens counted at least once."""
    adapter = loaded.adapter
    per_block = [output_weights(adapter, b) for b in blocks]
    weights = torch.cat(per_block).double()
    block = np.concatenate([np.full(len(w), b) for w, b in zip(per_block, blocks)])
    neuron = np.concatenate([np.arange(len(w)) for w in per_block])
    unembed = adapter.unembed_weight.detach().cpu()
    vectors, singular = cached_null_space(unembed, unembed.shape[1], cache_dir)
    affine = final_norm_affine(adapter)
    stats = ns.weight_statistics(weights, singular.double() ** 2, vectors, k, affine.gain.cpu(),
                                 affine.centre, unembed.double().mean(0), unembed.shape[0])
    table = pd.DataFrame({"block": block, "neuron": neuron, "norm": stats.norm,
                          "null_fraction": stats.null_fraction, "null_norm": stats.null_norm,
                          "logit_var": stats.logit_var})
    for col in ("norm", "null_fraction", "null_norm", "logit_var"):
        table[f"{col}_pct"] = ns.percentiles(table[col].to_numpy())
    table["norm_z"] = ns.robust_z(stats.norm)
    table["entropy_candidate"] = ns.entropy_flags(table["norm_pct"].to_numpy(),
                                                  stats.null_fraction, settings.norm_quantile,
                                                  settings.null_fraction)
    if counts is not None:
        seen = np.flatnonzero(counts > 0)
        unit = weights / weights.norm(dim=1, keepdim=True).clamp(min=1e-300)
        if affine.centre:
            unit = unit - unit.mean(1, keepdim=True)
        direction = (unit * affine.gain.cpu().double()[None]).float()  # [n, H]
        effects = direction @ unembed[torch.as_tensor(seen)].float().T  # [n, S]
        table["frequency_corr"] = ns.frequency_correlation(effects, counts[seen])
    order = ns.top_indices(stats.null_norm, len(table))
    table["rank"] = np.empty(len(table), dtype=np.int64)
    table.loc[order, "rank"] = np.arange(1, len(table) + 1)
    return Candidates(table, weights.numpy(), order[:settings.top_k], k)


# --- the arms ----------------------------------------------------------------------------------


@dataclass
class ArmPlan:
    """The ablated arms (candidates one by one, the top set, then the token-frequency set) and
    their nulls: ``draws`` [n_null, top_k] matched neurons of the top candidates (rows of the
    table); ``nulls[arm]`` the arm indices of that main arm's matched random draws."""

    names: list[str]
    arms: list[list[tuple[int, int, float]]]
    draws: np.ndarray
    n_main: int
    nulls: dict[int, np.ndarray] = field(default_factory=dict)
    frequency: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def null_of(self, arm: int) -> np.ndarray:
        """Arm indices of main arm ``arm``'s null (candidate j: the j-th neuron of every draw;
        a set: every draw of its own matched sets)."""
        return self.nulls[arm]


def frequency_rows(table: pd.DataFrame, n: int) -> np.ndarray:
    """Rows of the ``n`` token-frequency candidates (largest |correlation| first; none without
    the correlation column)."""
    if "frequency_corr" not in table or not n:
        return np.zeros(0, dtype=np.int64)
    corr = np.nan_to_num(np.abs(table["frequency_corr"].to_numpy()), nan=-1.0)
    return ns.top_indices(corr, min(n, len(table)))


def plan_arms(cands: Candidates, settings: NeuronSettings, seed: int) -> ArmPlan:
    """Each top candidate, the top set, the token-frequency set (the ``frequency_top``
    candidates, where counted) and ``n_null`` matched random draws of each (the frequency set's
    drawn with seed + 2)."""
    table, top = cands.table, cands.top
    block, neuron, norm = (table[c].to_numpy() for c in ("block", "neuron", "norm"))
    freq = frequency_rows(table, settings.frequency_top)

    def entry(row: int, scale: float = 1.0) -> tuple[int, int, float]:
        return int(block[row]), int(neuron[row]), float(scale)

    names = [cands.label(r) for r in top] + [SET_ARM]
    arms = [[entry(r)] for r in top] + [[entry(r) for r in top]]
    if len(freq):
        names.append(FREQUENCY_ARM)
        arms.append([entry(r) for r in freq])
    n_main = len(names)
    draws = np.zeros((0, len(top)), dtype=np.int64)
    nulls: dict[int, np.ndarray] = {}

    def matched(rows: np.ndarray, draw_seed: int) -> tuple[np.ndarray, np.ndarray]:
        pools = ns.matched_pools(norm, block, rows, settings.null_pool)
        got = ns.matched_draws(pools, settings.n_null, draw_seed)
        return got, norm[rows][None] / np.maximum(norm[got], 1e-300)  # [n_null, m] norm ratios

    if settings.n_null:
        draws, ratio = matched(top, seed)
        for j in range(len(top)):
            nulls[j] = len(arms) + np.arange(len(draws))
            arms += [[entry(draws[d, j], ratio[d, j])] for d in range(len(draws))]
        nulls[len(top)] = len(arms) + np.arange(len(draws))
        arms += [[entry(draws[d, j], ratio[d, j]) for j in range(len(top))]
                 for d in range(len(draws))]
        if len(freq):
            fdraws, fratio = matched(freq, seed + 2)
            nulls[len(top) + 1] = len(arms) + np.arange(len(fdraws))
            arms += [[entry(fdraws[d, j], fratio[d, j]) for j in range(len(freq))]
                     for d in range(len(fdraws))]
    return ArmPlan(names, arms, draws, n_main, nulls, freq)


# --- the study ---------------------------------------------------------------------------------


class _Probed:
    """The job context, except that its probe of the job's own prompts is the neuron pass's
    result (so fitting ĉ runs no second pass)."""

    def __init__(self, ctx: JobContext, base: ProbeResult) -> None:
        self._ctx, self._base = ctx, base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def probe(self, prompt_set: Any = None, keep: Any = ()) -> ProbeResult:
        own = prompt_set is None or prompt_set is self._ctx.prompt_set
        if own and set(keep) <= set(self._base.residuals):
            return self._base
        return self._ctx.probe(prompt_set, keep)


def _direction_keep(ctx: JobContext) -> list[int] | None:
    """The residual layers fitting ĉ reads (None: all of them, ``direction.layers=auto``)."""
    dset, last = ctx.spec.direction, ctx.num_layers - 1
    if dset.path:
        return [last]
    if dset.layers == "auto":
        return None
    layers = check_layers(dset.layers, ctx.num_layers)
    method = get_method(dset.method)
    extra = method.extra_layers(dset.method_settings(), [last], last)
    return sorted({*residual_layers_for(layers), last, *extra})


def _merged(n: int, parts: list[tuple[np.ndarray, ProbeResult]]) -> ProbeResult:
    """One result of ``n`` examples from results of index subsets."""
    first = parts[0][1]
    logits = np.empty((n, *first.option_logits.shape[1:]), dtype=first.option_logits.dtype)
    probs = np.empty((n, *first.probs.shape[1:]))
    labels = np.empty(n, dtype=first.labels.dtype)
    mass = None if first.option_mass is None else np.empty((n, first.option_mass.shape[1]))
    residuals = {l: np.empty((n, v.shape[1]), np.float32) for l, v in first.residuals.items()}
    real = computed = 0
    for idx, part in parts:
        logits[idx], probs[idx], labels[idx] = part.option_logits, part.probs, part.labels
        if mass is not None:
            mass[idx] = part.option_mass
        for layer, kept in residuals.items():
            kept[idx] = part.residuals[layer]
        real, computed = real + part.real_tokens, computed + part.computed_tokens
    return ProbeResult(logits, probs, labels, mass, residuals, real, computed)


def _final_null(plan: ArmPlan, total: np.ndarray, base: np.ndarray, labels: np.ndarray,
                arm: int, observed: dict[str, float], n_bins: int, binning: str
                ) -> dict[str, float]:
    """The arm's final-layer deltas against its matched null's (``total``: [A, N, K])."""
    ref = ns.variant_metrics(base, labels, n_bins, binning)
    chosen = plan.null_of(arm)
    draws = total[chosen]
    null = ns.variant_metrics(draws, labels, n_bins, binning)
    deltas = {m: null[m] - ref[m] for m in ns.EFFECT_METRICS}
    deltas["abs_entropy"] = ns.abs_entropy_change(base, draws)
    return {**ns.null_summary(observed, deltas), "n_null": len(chosen)}


@dataclass
class NeuronsResult(StudyResult):
    """Every neuron's statistics, the candidates, ĉ's relation to them and the ablations."""

    neurons: pd.DataFrame | None = None
    table: pd.DataFrame | None = None  # the ablation effects, one row per arm, effect, layer
    report_json: dict[str, Any] = field(default_factory=dict)
    files: ClassVar[tuple[str, ...]] = FILES

    def write(self, job_dir: Path) -> None:
        results.write_csv(Path(job_dir) / NEURONS_FILE, self.neurons)
        results.write_csv(Path(job_dir) / ABLATION_FILE, self.table)
        results.write_json(Path(job_dir) / NEURONS_JSON, self.report_json)

    def plot(self, job_dir: Path, title: str) -> dict[str, Path]:
        from calibrate.io.neuron_plots import plot_ablation, plot_neurons

        job_dir = Path(job_dir)
        return {"neurons": plot_neurons(self.neurons, job_dir / "neurons.png",
                                        f"{title}: MLP neurons of the last blocks",
                                        self.report_json["settings"]["top_k"]),
                "neuron_ablation": plot_ablation(self.table, job_dir / "neuron_ablation.png",
                                                 f"{title}: final-layer effect of ablations")}

    def log(self, tracker: Tracker, job_dir: Path) -> None:
        top = self.neurons[self.neurons["rank"] <= self.report_json["settings"]["top_k"]]
        tracker.log_table("neurons", top.sort_values("rank"))
        tracker.log_table("neuron_ablation", self.table)

    def tracker_summary(self) -> dict[str, Any]:
        report, flat = self.report_json, {}
        flat["neurons/entropy_candidates"] = len(report["entropy_candidates"])
        flat["neurons/c_hat_share"] = report["c_hat"]["span"].get("share")
        flat["neurons/c_hat_share_p"] = report["c_hat"]["span"].get("p_value")
        for arm in (SET_ARM, FREQUENCY_ARM, C_HAT_ARM, TEMPERATURE_ARM):
            for effect, row in (report["final"].get(arm) or {}).items():
                for key in ("delta_ece", "delta_entropy", "p_value_ece", "p_value_entropy"):
                    if key in row:
                        flat[f"neurons/{arm}/{effect}/{key}"] = row[key]
        return flat

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per ablated arm: the final layer's total and direct ΔECE, Δentropy,
        Δaccuracy with their intervals and null p-values."""
        rows = []
        keys = ("delta_ece", "delta_ece_lo", "delta_ece_hi", "delta_entropy", "delta_entropy_lo",
                "delta_entropy_hi", "delta_accuracy", "changed", "p_value_ece",
                "p_value_entropy")
        cands = {c["arm"]: c for c in self.report_json["candidates"]}
        for arm, effects in self.report_json["final"].items():
            row: dict[str, Any] = {"arm": arm, "blocks": self.report_json["blocks"][0]
                                   if len(self.report_json["blocks"]) == 1
                                   else str(self.report_json["blocks"])}
            if arm in cands:
                row.update(null_fraction=cands[arm]["null_fraction"], norm=cands[arm]["norm"])
            for effect, values_ in effects.items():
                row.update({f"{effect}_{k}": values_.get(k) for k in keys})
            rows.append(row)
        return rows

    def headline(self) -> list[str]:
        report = self.report_json
        lines = [(f"  entropy-neuron candidates: {len(report['entropy_candidates'])} of "
                  f"{report['n_neurons']} neurons (norm >= "
                  f"q{report['settings']['norm_quantile']:g}, "
                  f"null fraction >= {report['settings']['null_fraction']:g})")]
        for c in report["candidates"][:3]:
            lines.append(f"  #{c['rank']} block {c['block']} neuron {c['neuron']}: norm "
                         f"{c['norm']:.3g}, null fraction {c['null_fraction']:.3f}")
        span = report["c_hat"]["span"]
        if "share" in span:
            lines.append(f"  c_hat in the top {report['settings']['top_k']}'s span: "
                         f"{span['share']:.4f} (matched random {span['null_mean']:.4f}, "
                         f"p = {span['p_value']:.3g})")
        for arm in (SET_ARM, FREQUENCY_ARM, C_HAT_ARM, TEMPERATURE_ARM):
            for effect, v in (report["final"].get(arm) or {}).items():
                ci = (f" [{v['delta_ece_lo']:+.4f}, {v['delta_ece_hi']:+.4f}]"
                      if "delta_ece_lo" in v else "")
                p = f", p = {v['p_value_ece']:.3g}" if "p_value_ece" in v else ""
                lines.append(f"  {arm} {effect}: ECE {v['delta_ece']:+.4f}{ci}{p}, entropy "
                             f"{v['delta_entropy']:+.4f}")
        return lines


@register
class NeuronsStudy(Study):
    """Entropy and token-frequency neuron candidates of the last blocks, related to ĉ and
    mean-ablated."""

    name = "neurons"
    Settings = NeuronSettings
    reads = ("intervention.blocks", "intervention.top_k", "intervention.norm_quantile",
             "intervention.null_fraction", "intervention.frequency_top",
             "intervention.null_pool", "intervention.n_null", "intervention.span_draws",
             "direction", "nullspace.k", "nullspace.fraction", "baselines.log_t_bounds")
    description = "MLP neurons of the last blocks mean-ablated"

    def check_shape(self, spec: Any, num_blocks: int, hidden_size: int) -> None:
        settings = spec.intervention
        if settings.blocks > num_blocks:
            raise ConfigError(f"intervention.blocks={settings.blocks}; accepted: 1..{num_blocks} "
                              "(this model's blocks)")

    def run(self, ctx: JobContext) -> NeuronsResult:
        spec, loaded = ctx.spec, ctx.loaded
        settings: NeuronSettings = spec.intervention
        self.check_shape(spec, loaded.adapter.num_blocks, loaded.adapter.unembed_weight.shape[1])
        last = loaded.adapter.num_blocks
        blocks = list(range(last - settings.blocks + 1, last + 1))
        hidden = loaded.adapter.unembed_weight.shape[1]
        k = spec.nullspace.k_for(hidden)
        counts = ns.token_counts(loaded.tokenizer(list(ctx.prompt_set.prompts))["input_ids"],
                                 loaded.adapter.unembed_weight.shape[0])
        cands = find_candidates(loaded, blocks, k, cache_root(spec.cache_dir), settings, counts)
        if settings.top_k > len(cands.table):
            raise ConfigError(f"intervention.top_k={settings.top_k}; accepted: 1..{len(cands.table)} "
                              "(the neurons of the chosen blocks)")
        plan = plan_arms(cands, settings, spec.seed)
        cal, evaluation = ctx.split()
        keep = _direction_keep(ctx)
        keep = list(range(ctx.num_layers)) if keep is None else keep
        probe = spec.probe
        cal_pass = neuron_pass(loaded, ctx.prompt_set.subset(cal), blocks, probe, ctx.readout,
                               keep)
        means = cal_pass.pooled_mean()
        arms = NeuronArms.build(blocks, means, plan.arms)
        eval_set = ctx.prompt_set.subset(evaluation)
        eval_pass = neuron_pass(loaded, eval_set, blocks, probe, ctx.readout, keep, arms)
        base = _merged(len(ctx.prompt_set.prompts), [(cal, cal_pass.result),
                                                     (evaluation, eval_pass.result)])
        fit = obtain_direction(_Probed(ctx, base), [last])
        c_hat = fit.direction.vector
        table, report = self._measure(ctx, settings, cands, plan, eval_pass, base, cal, evaluation,
                                      c_hat, blocks, means, cal_pass)
        report["frequency_source"] = {
            "counts_from": "the job's own prompts, all splits (the tokenizer carries no training "
                           "counts)", "n_prompts": len(ctx.prompt_set.prompts),
            "n_tokens": int(counts.sum()), "distinct_tokens": int((counts > 0).sum())}
        report["n_arms"] = arms.n_arms  # ablated arms, the nulls' included
        report["direction"] = {key: fit.direction.meta.get(key) for key in
                               ("method", "layers", "raw_norm", "null_space_rho",
                                "cosine_layer_diff")}
        summary = {"intervention": self.name, "n_calibration": len(cal),
                   "n_evaluation": len(evaluation),
                   "neurons": {key: report[key] for key in
                               ("blocks", "k", "n_neurons", "entropy_candidates", "candidates",
                                "frequency_candidates", "frequency_source", "c_hat", "final",
                                "direct_effect", "direction")}}
        return NeuronsResult(ctx.report(base.take(evaluation), eval_set), summary,
                             neurons=cands.table, table=table, report_json=report)

    def _measure(self, ctx: JobContext, settings: NeuronSettings, cands: Candidates,
                 plan: ArmPlan, eval_pass: Any, base: ProbeResult, cal: np.ndarray,
                 evaluation: np.ndarray, c_hat: np.ndarray, blocks: list[int],
                 means: dict[int, np.ndarray], cal_pass: Any
                 ) -> tuple[pd.DataFrame, dict[str, Any]]:
        spec, m = ctx.spec, ctx.spec.metrics
        last = ctx.num_layers - 1
        labels = base.labels[evaluation]
        first = eval_pass.first
        layers = list(range(first, last + 1))
        base_eval = base.option_logits[evaluation][:, first:]  # [N, n, K]
        table = cands.table
        table["cos_c_hat"] = ns.cosines(c_hat, cands.weights)
        table["abs_cos_c_hat_pct"] = ns.percentiles(np.abs(table["cos_c_hat"].to_numpy()))
        table["mean_activation"] = np.concatenate([means[b] for b in blocks])
        spread = cal_pass.pooled_std()
        table["activation_std"] = np.concatenate([spread[b] for b in blocks])
        n_main = plan.n_main
        boot = (m.bootstrap, m.alpha, m.seed)
        rows = ns.effect_table(base_eval, eval_pass.total[:n_main], labels, plan.names, layers,
                               "total", m.n_bins, m.binning, *boot)
        direct = eval_pass.direct is not None
        if direct:
            rows += ns.effect_table(base_eval, eval_pass.direct[:n_main], labels, plan.names,
                                    layers, "direct", m.n_bins, m.binning, *boot)
        # ĉ's own component mean-ablated at the last layer (at the ablated positions, its
        # mean over the calibration split's), and temperature scaling
        if eval_pass.finals is not None:  # cloze: every scoring state
            mean_c = final_term_mean(cal_pass, c_hat)

            def along(states: np.ndarray) -> np.ndarray:
                x = states.astype(np.float64)
                return ((mean_c - x @ c_hat)[:, None] * c_hat[None])[None]

            c_total, c_direct = cloze_final_edits(ctx.loaded, eval_pass, along, ctx.readout,
                                                  direct)
        else:
            residual = base.residuals[last]
            mean_c = float(residual[cal].astype(np.float64).mean(0) @ c_hat)
            x = residual[evaluation].astype(np.float64)
            delta = ((mean_c - x @ c_hat)[:, None] * c_hat[None])[None]
            c_total, c_direct = last_layer_edits(ctx.loaded, x, delta, ctx.prompt_set.option_ids[
                evaluation], ctx.readout, direct)
        final_base = base.option_logits[evaluation][:, -1:]
        rows += ns.effect_table(final_base, c_total[:, :, None], labels, [C_HAT_ARM], [last],
                                "total", m.n_bins, m.binning, *boot)
        if c_direct is not None:
            rows += ns.effect_table(final_base, c_direct[:, :, None], labels, [C_HAT_ARM], [last],
                                    "direct", m.n_bins, m.binning, *boot)
        t = fit_temperature(base.option_logits[cal][:, -1], base.labels[cal],
                            spec.baselines.log_t_bounds)
        rows += ns.effect_table(final_base, (final_base / t)[None], labels, [TEMPERATURE_ARM],
                                [last], "total", m.n_bins, m.binning, *boot)
        effects = pd.DataFrame(rows)
        # only the layers an arm can move: from its lowest block up (the rows below are the
        # unablated reads by construction, and counting them would inflate the comparisons)
        lowest = {name: min(b for b, _, _ in arm) for name, arm in
                  zip(plan.names, plan.arms[:n_main])}
        movable = [int(layer) >= lowest.get(arm, 0) for arm, layer in
                   zip(effects["arm"], effects["layer"])]
        effects = effects[movable].reset_index(drop=True)
        final = self._final(effects, plan, eval_pass, base_eval, labels, last, m)
        for arm, per_effect in final.items():  # the null's columns on the last layer's rows
            for effect, values_ in per_effect.items():
                at = (effects["arm"] == arm) & (effects["effect"] == effect) & \
                    (effects["layer"] == last)
                for key, value in values_.items():
                    if key.startswith(("null_", "p_value_", "n_null")):
                        effects.loc[at, key] = value
        top = table.iloc[cands.top]
        report = {
            "blocks": blocks, "k": cands.k, "n_neurons": len(table),
            "settings": {f: getattr(settings, f) for f in
                         ("top_k", "norm_quantile", "null_fraction", "frequency_top",
                          "null_pool", "n_null", "span_draws")},
            "reference": {col: _quantiles(table[col]) for col in
                          ("norm", "null_fraction", "null_norm", "logit_var")},
            "candidates": [_candidate(row, cands.label(i)) for i, row in
                           zip(cands.top, top.to_dict("records"))],
            "entropy_candidates": [_candidate(row, f"b{row['block']}_n{row['neuron']}") for row in
                                   table[table["entropy_candidate"]].sort_values("rank")
                                   .to_dict("records")],
            "frequency_candidates": _frequency(table, settings.frequency_top),
            "c_hat": self._c_hat(c_hat, cands, plan, settings, spec.seed),
            "final": final,
            "direct_effect": None if direct else
            f"not read: the {ctx.readout.name} readout does not read the final norm's output",
            "temperature": t,
            "c_hat_component_mean": mean_c,
        }
        return effects, report

    def _final(self, effects: pd.DataFrame, plan: ArmPlan, eval_pass: Any, base_eval: np.ndarray,
               labels: np.ndarray, last: int, m: Any) -> dict[str, dict[str, dict[str, float]]]:
        """Per arm and effect: the last layer's row, with the matched null's p-values."""
        keep = ["delta_" + x for x in ns.EFFECT_METRICS] + ["changed", "abs_delta_entropy"] + [
            c for c in effects.columns if c.endswith(("_lo", "_hi"))]
        out: dict[str, dict[str, dict[str, float]]] = {}
        rows = effects[effects["layer"] == last]
        for row in rows.to_dict("records"):
            values_ = {k: float(row[k]) for k in keep if k in row and pd.notna(row[k])}
            arm = row["arm"]
            if arm in plan.names and plan.names.index(arm) in plan.nulls:
                index = plan.names.index(arm)
                source = eval_pass.total if row["effect"] == "total" else eval_pass.direct
                observed = {x: row[f"delta_{x}"] for x in ns.EFFECT_METRICS}
                observed["abs_entropy"] = row["abs_delta_entropy"]
                values_.update(_final_null(plan, source[:, :, -1], base_eval[:, -1], labels,
                                           index, observed, m.n_bins, m.binning))
            out.setdefault(arm, {})[row["effect"]] = values_
        return out

    @staticmethod
    def _c_hat(c_hat: np.ndarray, cands: Candidates, plan: ArmPlan, settings: NeuronSettings,
               seed: int) -> dict[str, Any]:
        table = cands.table
        span: dict[str, Any] = {"share": ns.span_share(c_hat, cands.weights[cands.top])}
        if settings.span_draws:
            norm, block = table["norm"].to_numpy(), table["block"].to_numpy()
            pools = ns.matched_pools(norm, block, cands.top, settings.null_pool)
            draws = ns.matched_draws(pools, settings.span_draws, seed + 1)
            span = ns.span_null(c_hat, cands.weights, cands.top, draws)
        cos = table["cos_c_hat"].to_numpy()
        return {"span": span, "top_cosines": [float(cos[r]) for r in cands.top],
                "max_abs_cosine": float(np.abs(cos).max()),
                "max_abs_cosine_neuron": cands.label(int(np.abs(cos).argmax())),
                "abs_cosine_median": float(np.median(np.abs(cos)))}


def _quantiles(column: pd.Series) -> dict[str, float]:
    q = np.quantile(column.to_numpy(dtype=np.float64), [0.5, 0.9, 0.99, 1.0])
    return {"median": float(q[0]), "q90": float(q[1]), "q99": float(q[2]), "max": float(q[3])}


def _candidate(row: dict[str, Any], label: str) -> dict[str, Any]:
    keep = ("rank", "block", "neuron", "norm", "null_fraction", "null_norm", "logit_var",
            "norm_pct", "null_fraction_pct", "logit_var_pct", "norm_z", "entropy_candidate",
            "frequency_corr", "cos_c_hat", "mean_activation", "activation_std")
    out = {"arm": label}
    for key in keep:
        if key in row:
            value = row[key]
            out[key] = bool(value) if key == "entropy_candidate" else (
                int(value) if key in ("rank", "block", "neuron") else float(value))
    return out


def _frequency(table: pd.DataFrame, n: int) -> list[dict[str, Any]]:
    if "frequency_corr" not in table or not n:
        return []
    corr = table["frequency_corr"].to_numpy()
    order = frequency_rows(table, n)
    return [{"block": int(table["block"].iloc[r]), "neuron": int(table["neuron"].iloc[r]),
             "frequency_corr": float(corr[r]), "norm": float(table["norm"].iloc[r]),
             "null_fraction": float(table["null_fraction"].iloc[r]),
             "rank": int(table["rank"].iloc[r])} for r in order]
