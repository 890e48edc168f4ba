"""Selective prediction: the risk–coverage curve and the area under it (AURC), per layer.

Examples are answered in order of decreasing top-label confidence; at coverage k/N the risk is
the error rate of the k most confident answers (Geifman & El-Yaniv 2017). AURC is the mean risk
over k = 1..N; E-AURC (Geifman et al. 2019) subtracts the AURC of the best possible order (every
correct answer before every wrong one), so 0 is a perfect ranking whatever the accuracy.

Tied confidences have no order: the risk at a coverage inside a group of tied examples is its
expectation over the group's orders (exactly ``(e + j·w/m) / (c + j)`` for the j-th of m tied
examples, w of them wrong, after c examples with e errors), so the result does not depend on the
order the examples come in.
"""

from __future__ import annotations

import numpy as np


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [N], risk [N]): coverage k/N and the expected error rate of the k most
    confident answers, k = 1..N (ties as in the module docstring)."""
    conf = np.asarray(confidence, dtype=np.float64)
    wrong = 1.0 - np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != wrong.shape or conf.size == 0:
        raise ValueError(f"need confidence and correct of one shape [N], N >= 1; got "
                         f"{conf.shape} and {wrong.shape}")
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], wrong[order]
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
    sizes = np.diff(np.r_[starts, conf.size])
    group_wrong = np.add.reduceat(wrong, starts)
    rate = np.repeat(group_wrong / sizes, sizes)  # each tied example counts w/m errors
    errors = np.cumsum(rate)
    k = np.arange(1, conf.size + 1)
    return k / conf.size, errors / k


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk–coverage curve: the mean risk over coverages 1/N .. N/N."""
    return float(risk_coverage(confidence, correct)[1].mean())


def optimal_aurc(correct: np.ndarray) -> float:
    """The AURC of the best order (every correct answer first)."""
    right = np.asarray(correct, dtype=np.float64)
    best = np.sort(1.0 - right)  # errors last
    k = np.arange(1, right.size + 1)
    return float((np.cumsum(best) / k).mean())


def excess_aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """E-AURC: AURC minus the AURC of the best order (0: a perfect ranking)."""
    return aurc(confidence, correct) - optimal_aurc(correct)
