"""Per-example outputs in the shapes other tools read: a tidy parquet table and lm-eval samples.

* ``predictions.parquet``: one row per example × layer × option (``example, record, subject,
  label, layer, option, option_text, score, probability, is_label, predicted``), which pandas,
  polars and DuckDB open directly. ``score`` is the option's logit (letters, verbalizer) or its
  normalised log-likelihood (cloze), ``probability`` the float64 softmax over the options.
* ``samples_lmeval.jsonl``: the last layer as lm-eval's ``--log_samples`` writes a
  multiple-choice task: ``doc_id``, ``doc``, ``target``, ``arguments`` (context, continuation
  per option), ``resps``/``filtered_resps`` ([log-likelihood, is_greedy] per option), ``acc``
  (and ``acc_norm`` for cloze). The log-likelihood is the option's full-vocabulary log
  probability: for one-token options the option logit minus the log-sum-exp over the options
  plus the log of the vocabulary mass on them (so it needs ``probe.option_mass``), for cloze the
  summed continuation log-probability. ``is_greedy`` is not computed here and written as null.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from calibrate.io import results

PARQUET_FILE = "predictions.parquet"
SAMPLES_FILE = "samples_lmeval.jsonl"


def tidy_predictions(probs: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     examples: Sequence[Any] | None, option_texts: Sequence[str]) -> pd.DataFrame:
    """The long table of ``probs``/``scores`` [N, L, K] (slots an example lacks left out).
    ``examples`` (one ``(record, subject, options)``-like object per example, or None) name the
    rows; ``option_texts`` are the strings read per slot (single-token formats)."""
    n, layers, k = probs.shape
    ex, layer, opt = np.meshgrid(np.arange(n), np.arange(layers), np.arange(k), indexing="ij")
    exists = np.isfinite(scores)
    predicted = probs.argmax(-1)[..., None] == np.arange(k)
    table = pd.DataFrame({
        "example": ex[exists], "layer": layer[exists], "option": opt[exists],
        "score": scores[exists].astype(np.float64), "probability": probs[exists],
        "is_label": (opt == labels[:, None, None])[exists], "predicted": predicted[exists]})
    table.insert(1, "label", labels[table["example"]])
    if examples is not None:
        records = np.array([e.record for e in examples], dtype=object)
        subjects = np.array([e.subject for e in examples], dtype=object)
        table.insert(1, "record", records[table["example"]])
        table.insert(2, "subject", subjects[table["example"]])
        texts = [list(e.options) for e in examples]
        table["option_text"] = [texts[i][j] for i, j in zip(table["example"], table["option"])]
    elif option_texts:
        table["option_text"] = np.array(list(option_texts), dtype=object)[table["option"]]
    return table


def write_parquet(path: Path, table: pd.DataFrame) -> Path:
    """Write ``table`` as parquet, atomically."""
    return results.atomic_write(Path(path), lambda h: table.to_parquet(h, index=False))


def option_logprobs(option_logits: np.ndarray, option_mass: np.ndarray) -> np.ndarray:
    """Full-vocabulary log probability of each one-token option [N, K] from its logits [N, K]
    and the vocabulary mass on the options [N]: ``z_k − logsumexp(z) + log(mass)``."""
    return option_logits - logsumexp(option_logits, axis=-1, keepdims=True) \
        + np.log(option_mass)[:, None]


def lmeval_samples(prompts: Sequence[str], continuations: Sequence[Sequence[str]],
                   logliks: np.ndarray, labels: np.ndarray,
                   norm_scores: np.ndarray | None = None) -> list[dict[str, Any]]:
    """lm-eval ``--log_samples`` records of the last layer: one per example, ``logliks`` [N, K]
    (-inf or NaN where an example has no option k); ``norm_scores`` (cloze) gives ``acc_norm``."""
    out = []
    for i, (context, conts) in enumerate(zip(prompts, continuations)):
        ll = [float(x) for x in logliks[i, :len(conts)]]
        sample = {"doc_id": i, "doc": {"query": context, "choices": list(conts),
                                       "gold": int(labels[i])},
                  "target": int(labels[i]),
                  "arguments": [[context, c] for c in conts],
                  "resps": [[[x, None]] for x in ll], "filtered_resps": [[x, None] for x in ll],
                  "acc": float(int(np.argmax(ll)) == int(labels[i]))}
        if norm_scores is not None:
            sample["acc_norm"] = float(int(np.argmax(norm_scores[i, :len(conts)]))
                                       == int(labels[i]))
        out.append(sample)
    return out


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per line, atomically."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return results.write_text(Path(path), text)
