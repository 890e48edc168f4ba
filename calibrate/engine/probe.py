"""The layer-wise probe: one forward pass per batch, every layer read through the lens.

Prompts are tokenized once, sorted by length (longest first, so an out-of-memory shows up on
the first batch) and left-padded with explicit position ids; batched results equal unbatched
ones. The batch size is found from a padded-token budget and halves on out-of-memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate import values
from calibrate.core.option_scores import option_mass, option_probabilities
from calibrate.engine.hooks import capture_last_position
from calibrate.engine.lens import LogitLens
from calibrate.engine.readout import Readout
from calibrate.errors import ConfigError
from calibrate.model.load import LoadedModel
from calibrate.tasks.prompts import PromptSet

OPTION_MASS_MODES = ("final", "all", "none")


class NonFiniteActivations(FloatingPointError):
    """A residual became NaN or inf (e.g. fp16 overflow); names the first bad layer."""


@dataclass
class ProbeSettings:
    """How the probe batches and what it reports: the ``probe`` config group, checked."""

    batch_size: Any = "auto"  # auto (None): from max_tokens, halved on out-of-memory; or an int
    max_batch_size: int = 64
    max_tokens: int = 8192
    min_fill: float = 0.9  # least share of real (non-padding) tokens in a batch
    option_mass: str = "final"
    prefix_reuse: bool = True  # prompts with a shared exemplar prefix: run it once per group
    progress: bool = True
    keep_layers: ClassVar[tuple[int, ...]] = ()  # a pass that keeps residuals: see keeping()

    def __post_init__(self) -> None:
        if self.batch_size in (None, "auto"):
            self.batch_size = None
        elif isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"probe.batch_size={self.batch_size!r}; accepted: auto or "
                              "an integer >= 1")
        values.integer("probe.max_batch_size", self.max_batch_size, 1)
        values.integer("probe.max_tokens", self.max_tokens, 1)
        values.number("probe.min_fill", self.min_fill, lambda f: 0 <= f <= 1, "a number in [0, 1]")
        values.choice("probe.option_mass", self.option_mass, OPTION_MASS_MODES)
        values.flag("probe.prefix_reuse", self.prefix_reuse)
        values.flag("probe.progress", self.progress)

    def keeping(self, layers: Sequence[int]) -> ProbeSettings:
        """These settings for a pass that also returns the last-position residuals of ``layers``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("keep_layers", None)
        return KeepingResiduals(**fields, keep_layers=tuple(int(l) for l in layers))


@dataclass
class KeepingResiduals(ProbeSettings):
    """Probe settings of a pass that returns the residuals of ``keep_layers`` (never a config)."""

    keep_layers: tuple[int, ...] = ()


@dataclass
class ProbeResult:
    """Per-example, per-layer outputs of the probe, in the original example order."""

    option_logits: np.ndarray  # [N, L+1, K] float32, -inf where an example has no option K
    probs: np.ndarray  # [N, L+1, K] float64 softmax over the options
    labels: np.ndarray  # [N]
    option_mass: np.ndarray | None  # [N, L+1] (all) or [N, 1] (final) full-vocabulary mass
    residuals: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [N, hidden] float32
    real_tokens: int = 0
    computed_tokens: int = 0

    @property
    def num_layers(self) -> int:
        """L + 1: the embedding output plus one layer per block."""
        return self.option_logits.shape[1]

    @property
    def padding_efficiency(self) -> float:
        """Share of computed token positions that are real rather than padding."""
        return self.real_tokens / max(self.computed_tokens, 1)

    def take(self, idx: np.ndarray) -> ProbeResult:
        """The examples at ``idx`` (token counts are those of the whole run)."""
        mass = None if self.option_mass is None else self.option_mass[idx]
        return ProbeResult(self.option_logits[idx], self.probs[idx], self.labels[idx], mass,
                           {layer: v[idx] for layer, v in self.residuals.items()},
                           self.real_tokens, self.computed_tokens)


def plan_batches(lengths: np.ndarray, settings: ProbeSettings) -> list[np.ndarray]:
    """Group example indices into batches, longest first.

    A batch closes when it reaches the batch size; with the automatic batch size also when its
    padded size would pass ``max_tokens`` or when adding the next (shorter) prompt would drop its
    share of real tokens below ``min_fill``. An explicit ``batch_size`` is taken as given.
    """
    order = np.argsort(-lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    cap = settings.batch_size or settings.max_batch_size
    for idx in order:
        length = int(lengths[idx])
        if current:
            width, count = int(lengths[current[0]]), len(current) + 1
            full = len(current) >= cap
            auto = settings.batch_size is None
            over_budget = auto and width * count > settings.max_tokens
            underfilled = auto and (real + length) / (width * count) < settings.min_fill
            if full or over_budget or underfilled:
                batches.append(current)
                current, real = [], 0
        current.append(int(idx))
        real += length
    if current:
        batches.append(current)
    return [np.array(b) for b in batches]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: (input_ids, attention_mask), both [B, T] int64."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def check_finite(stacked: torch.Tensor) -> None:
    """Raise :class:`NonFiniteActivations` naming the first layer with a NaN or inf residual."""
    bad = ~torch.isfinite(stacked).all(dim=-1).all(dim=0)  # [L+1]
    if bool(bad.any()):
        layer = int(bad.nonzero()[0])
        raise NonFiniteActivations(f"non-finite residual at layer {layer} (of {stacked.shape[1]}); "
                                   "fp16 overflow? try model.dtype=bfloat16 or float32")


class _Accumulator:
    """Collects batch outputs back into the original example order."""

    def __init__(self, n: int, layers: int, k: int, mass: str, keep: Sequence[int]) -> None:
        self.logits = np.empty((n, layers, k), dtype=np.float32)
        mass_width = {"all": layers, "final": 1}.get(mass)
        self.mass = None if mass_width is None else np.empty((n, mass_width), dtype=np.float64)
        self.keep = {layer: None for layer in keep}
        self.real = 0
        self.computed = 0

    def add(self, idx: np.ndarray, logits, mass, stacked: torch.Tensor) -> None:
        self.logits[idx] = logits.cpu().numpy()
        if self.mass is not None:
            self.mass[idx] = mass.cpu().numpy()
        for layer in self.keep:
            rows = stacked[:, layer].float().cpu().numpy()
            if self.keep[layer] is None:
                self.keep[layer] = np.empty((self.logits.shape[0], rows.shape[1]), np.float32)
            self.keep[layer][idx] = rows


def _lens_batch(lens: Readout, stacked: torch.Tensor, option_ids: torch.Tensor, mass_mode: str):
    normed = lens.prepare(stacked, range(stacked.shape[1]))  # [B, L+1, H]
    logits = lens.option_logits(normed, option_ids)
    mass = None
    if mass_mode == "all":
        mass = option_mass(logits, lens.vocab_logsumexp(normed))
    elif mass_mode == "final":
        mass = option_mass(logits[:, -1:], lens.vocab_logsumexp(normed[:, -1:]))
    return logits, mass


def forward_batch(loaded: LoadedModel, lens: Readout, ids: torch.Tensor, mask: torch.Tensor,
                  option_ids: torch.Tensor, mass_mode: str):
    """One forward pass of the backbone; returns (option logits, mass, stacked residuals)."""
    device = loaded.device
    with torch.inference_mode(), capture_last_position(loaded.adapter) as store:
        loaded.adapter.backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=position_ids(mask).to(device), use_cache=False)
        stacked = torch.stack([t.to(lens.device) for t in store], dim=1)  # [B, L+1, H]
        check_finite(stacked)
        logits, mass = _lens_batch(lens, stacked, option_ids, mass_mode)
    return logits, mass, stacked


def tokenize(loaded: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's own special-token default (BOS or not)."""
    return loaded.tokenizer(list(prompts))["input_ids"]


def run_probe(loaded: LoadedModel, prompt_set: PromptSet, settings: ProbeSettings | None = None,
              readout: Readout | None = None) -> ProbeResult:
    """Read every layer of ``loaded`` at the last prompt position for every prompt, through
    ``readout`` (default: the logit lens).

    Prompts that share an exemplar prefix (``prompt_set.groups``, from ``prompt.shots``) run it
    once per group with ``settings.prefix_reuse`` (:mod:`calibrate.engine.prefix`); the others
    run in full.
    """
    from calibrate.engine.prefix import grouped_batches, suffix_batch

    settings = settings or ProbeSettings()
    lens = readout or LogitLens(loaded.adapter)
    if settings.option_mass != "none" and not lens.full_vocabulary:
        raise ValueError(f"probe.option_mass={settings.option_mass!r} needs a readout of the whole "
                         f"vocabulary; the {lens.name} readout reads only the options (set "
                         "probe.option_mass=none)")
    token_ids = tokenize(loaded, prompt_set.prompts)
    n, k = prompt_set.option_ids.shape
    acc = _Accumulator(n, loaded.adapter.num_blocks + 1, k, settings.option_mass, settings.keep_layers)
    with tqdm(total=n, desc=f"probe {loaded.name}", unit="ex", disable=not settings.progress) as bar:
        def count_prefix(prefix) -> None:
            acc.real += prefix.length
            acc.computed += prefix.length

        def run(idx: np.ndarray, _settings: ProbeSettings, prefix):
            option_ids = torch.from_numpy(prompt_set.option_ids[idx])
            if prefix is not None:
                return suffix_batch(loaded, lens, prefix,
                                    [token_ids[i][prefix.length:] for i in idx], option_ids,
                                    settings.option_mass)
            ids, mask = left_pad([token_ids[i] for i in idx], loaded.tokenizer.pad_token_id)
            return (*forward_batch(loaded, lens, ids, mask, option_ids, settings.option_mass), mask)

        for idx, (logits, mass, stacked, mask) in grouped_batches(
                loaded, token_ids, prompt_set.groups, settings, run, on_prefix=count_prefix):
            acc.add(idx, logits, mass, stacked)
            acc.real += int(mask.sum())
            acc.computed += mask.numel()
            bar.update(len(idx))
    return ProbeResult(acc.logits, option_probabilities(acc.logits), prompt_set.labels.copy(),
                       acc.mass, dict(acc.keep), acc.real, acc.computed)


def run_batches(lengths: np.ndarray, settings: ProbeSettings,
                run: Callable[[np.ndarray, ProbeSettings], Any]) -> Iterator[tuple[np.ndarray, Any]]:
    """Plan batches by length and yield ``(idx, run(idx, settings))`` for each; on out of
    memory the batch size is halved and the failed batch and all pending ones are re-planned
    (a single example that does not fit re-raises)."""
    pending = plan_batches(lengths, settings)
    while pending:
        idx = pending.pop(0)
        try:
            out = run(idx, settings)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_out_of_memory(err) or len(idx) == 1:
                raise
            settings = halved_settings(settings, len(idx))
            pending = plan_batches_subset(lengths, np.concatenate([idx, *pending]), settings)
            torch.cuda.empty_cache()
            continue
        yield idx, out


def halved_settings(settings: ProbeSettings, failed: int) -> ProbeSettings:
    from dataclasses import replace

    half = max(failed // 2, 1)
    tqdm.write(f"[calibrate] out of memory with {failed} prompts per batch; retrying with {half}")
    return replace(settings, batch_size=None, max_batch_size=half,
                   max_tokens=max(settings.max_tokens // 2, 1))


def plan_batches_subset(lengths: np.ndarray, subset: np.ndarray, settings: ProbeSettings) -> list[np.ndarray]:
    """:func:`plan_batches` over a subset of example indices."""
    return [subset[b] for b in plan_batches(lengths[subset], settings)]
