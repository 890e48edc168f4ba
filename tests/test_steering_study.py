"""The steering study's own checks and headline: edits too large or too small for the residual
warn with the ratio and the unit that would act; the headline names what was steered."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from calibrate.config.schema import CheckSettings
from calibrate.studies.steering import _check_edit_size, steering_label


def _base(norm: float, layer: int = 3):
    # every calibration row has the same residual norm, so the mean norm is exactly `norm`
    rows = np.zeros((4, 8), dtype=np.float32)
    rows[:, 0] = norm
    return SimpleNamespace(residuals={layer: rows})


def _check(etas, norm, scale=None, **checks):
    spec = SimpleNamespace(checks=CheckSettings(**checks))
    _check_edit_size(spec, etas, _base(norm), np.arange(4), [3], scale)


def test_tiny_absolute_edit_warns_with_the_ratio_and_the_residual_norm_unit(caplog):
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        _check([0, 2, 4, 8], 1000.0)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg == ("eta=8 adds an edit only 0.008 times the mean residual norm (1000) at layer 3 "
                   "(checks.edit_ratio_tiny=0.01): too small to move the output; eta is absolute; "
                   "with intervention.eta_scale=residual_norm (eta in multiples of that norm) "
                   "this edit is eta=0.008")


def test_tiny_residual_norm_edit_says_raise_it(caplog):
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        _check([0, 0.005], 40.0, scale={3: 40.0})
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("eta=0.005 adds an edit only 0.005 times the mean residual norm (40)")
    assert msg.endswith("eta is in multiples of that norm (intervention.eta_scale=residual_norm): "
                        "raise it")


@pytest.mark.parametrize("etas, norm, checks", [
    ([0, 10], 1000.0, {}),                      # exactly 0.01 of the norm: not below it
    ([0, 8], 1000.0, {"edit_ratio_tiny": 0}),   # 0: never warn
    ([0], 1000.0, {}),                          # eta = 0 alone adds nothing to warn about
])
def test_edits_at_or_above_the_threshold_do_not_warn(caplog, etas, norm, checks):
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        _check(etas, norm, **checks)
    assert caplog.records == []


def test_huge_edit_still_warns_as_before(caplog):
    with caplog.at_level(logging.WARNING, logger="calibrate"):
        _check([0, 500], 2.0, edit_ratio_warn=100)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("eta=500 adds an edit 250 times the mean residual norm (2) at layer 3")


def test_bad_input_edit_ratio_tiny_is_refused():
    from calibrate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checks.edit_ratio_tiny=-0.1; accepted: a number >= 0"):
        CheckSettings(edit_ratio_tiny=-0.1)


def test_headline_names_method_layers_data_and_unit():
    meta = {"method": "gradient", "layers": [27, 28, 29], "dataset": "sst2"}
    assert steering_label(meta, (30,), "residual_norm") == (
        "steering: c_hat by gradient from layers [27, 28, 29] on sst2, added at layer(s) [30]; "
        "eta x the mean residual norm at the edited layer")
    assert steering_label({"method": "pca"}, (5, 7), "absolute") == (
        "steering: c_hat by pca, added at layer(s) [5, 7]; eta absolute (x a unit c_hat)")
