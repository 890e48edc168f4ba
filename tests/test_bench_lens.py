"""The lens benchmark's arguments and its KL-at-three-depths figure (the timings are not tested)."""

from __future__ import annotations

import pytest

from calibrate.bench.lens_bench import depths, fit_only, parse_args


def test_depths_are_a_quarter_a_half_and_three_quarters_of_the_layers():
    kl = {"layer": list(range(8)), "logit": [float(i) for i in range(8)],
          "tuned": [i / 10 for i in range(8)]}
    # 8 layers below the last: indices 2, 4 and 6
    assert depths(kl, "tuned") == {"2": {"logit": 2.0, "tuned": 0.2},
                                   "4": {"logit": 4.0, "tuned": 0.4},
                                   "6": {"logit": 6.0, "tuned": 0.6}}
    assert depths(None, "tuned") == {} and depths({}, "affine") == {}


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--rounds", "2", "--fit-rounds", "3"], "--fit-rounds 3 exceeds --rounds 2"),
    (["--fits", "affine,logit"], "--fits 'affine,logit': accepted: affine, tuned or both"),
    (["--fits", ","], "--fits ',': accepted"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_lens_settings_pass_through():
    args = parse_args(["--rounds", "2", "lens.steps=5", "lens.kl_tokens=16"])
    assert args.rounds == 2 and args.fit_rounds == 1
    assert args.lens_overrides == ["lens.steps=5", "lens.kl_tokens=16"]


def test_the_bench_file_is_named_with_output_as_in_every_bench():
    assert parse_args(["--output", "x.json"]).output == "x.json"
    assert parse_args([]).output == "bench.json"


def test_ratios_are_per_round_medians():
    from calibrate.bench.lens_bench import ratios

    # the load triples after round 1: per-round ratios keep it out
    times = {"probe": [10.0, 30.0, 30.0], "tuned_read": [12.0, 33.0, 39.0],
             "tuned_fit": [100.0], "affine_fit": [20.0], "affine_fit_only": [15.0]}
    out = ratios(times)
    assert out["tuned_read_over_probe"] == pytest.approx(1.2)  # median of 1.2, 1.1, 1.3
    assert out["tuned_fit_over_probe"] == pytest.approx(10.0)
    assert out["affine_fit_over_probe"] == pytest.approx(2.0)
    assert out["affine_fit_only_over_probe"] == pytest.approx(1.5)
    assert "tuned_fit_only_over_probe" not in out


def test_the_fits_are_both_by_default_or_those_named():
    assert parse_args([]).fits == ["affine", "tuned"]
    assert parse_args(["--fits", "affine"]).fits == ["affine"]


def test_a_fit_without_its_report_is_the_rest_of_its_breakdown():
    assert fit_only({"fit": 40.0, "kl_report": 20.0}) == 40.0
    assert fit_only({"residuals": 30.0, "training": 70.0, "kl_report": 20.0}) == 100.0
