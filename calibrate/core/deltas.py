"""Tables of variants against a reference: one row per variant and layer, with deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from calibrate.core.metrics import layer_table
from calibrate.core.option_scores import option_probabilities


def steering_table(logits: np.ndarray, labels: np.ndarray, etas: Sequence[Any], n_bins: int,
                   binning: str, reference: int, column: str = "eta") -> pd.DataFrame:
    """Per variant (eta) and layer: metrics, deltas against the variant at index ``reference``
    (eta 0), and the share of examples whose predicted answer changed."""
    probs = option_probabilities(logits)  # [E, N, L+1, K]
    base = layer_table(probs[reference], labels, n_bins=n_bins, binning=binning)
    tables = []
    for index, p in enumerate(probs):
        # a layer whose probabilities equal the reference's (below an edit) has its metrics
        same = np.array([np.array_equal(p[:, l], probs[reference][:, l])
                         for l in range(p.shape[1])])
        if index == reference or same.all():
            tables.append(base.copy())
            continue
        first = int(np.argmin(same)) if not same[0] else int(np.argmax(~same))
        if same[:first].all() and not same[first:].any():
            upper = layer_table(p[:, first:], labels, n_bins=n_bins, binning=binning)
            upper["layer"] += first
            tables.append(pd.concat([base.iloc[:first], upper], ignore_index=True))
        else:
            tables.append(layer_table(p, labels, n_bins=n_bins, binning=binning))
    base_pred = probs[reference].argmax(-1)
    rows = []
    for eta, table, p in zip(etas, tables, probs):
        table = table.copy()
        for metric in ("accuracy", "ece", "mce"):
            table[f"delta_{metric}"] = table[metric] - base[metric]
        table["changed"] = (p.argmax(-1) != base_pred).mean(axis=0)
        table.insert(0, column, eta)
        rows.append(table)
    return pd.concat(rows, ignore_index=True)
