"""Checks of single config values (calibrate/values.py): each helper on hand-picked values, the
exact message (key, value, what is accepted) and the error class a caller chooses."""

from __future__ import annotations

import math

import pytest

from calibrate import values
from calibrate.errors import ConfigError, UserError


class OwnError(UserError):
    """A package's own error class, passed to the helpers."""


def message(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        call(*args, **kwargs)
    assert type(err.value) is ConfigError  # the default class
    return str(err.value)


# ---------------------------------------------------------------- choice

def test_choice():
    assert values.choice("metrics.binning", "guo", ("guo", "torchmetrics")) == "guo"
    assert message(values.choice, "metrics.binning", "x", ("guo", "torchmetrics")) == \
        "metrics.binning='x'; accepted: guo, torchmetrics"
    # not a string: refused even when it equals an option's text otherwise
    assert message(values.choice, "k", 1, ("1", "2")) == "k=1; accepted: 1, 2"
    assert message(values.choice, "k", None, ("a",)) == "k=None; accepted: a"
    with pytest.raises(OwnError, match=r"^k='b'; accepted: a$"):
        values.choice("k", "b", ("a",), OwnError)


# ---------------------------------------------------------------- number

@pytest.mark.parametrize("value, expected", [(0, 0.0), (1, 1.0), (0.5, 0.5), (-0.0, 0.0)])
def test_number_accepts(value, expected):
    got = values.number("probe.min_fill", value, lambda f: 0 <= f <= 1, "a number in [0, 1]")
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value, shown", [
    (1.5, "1.5"), (-0.1, "-0.1"), ("0.5", "'0.5'"), (True, "True"), (False, "False"),
    (float("nan"), "nan"), (float("inf"), "inf"), (None, "None"), ([0.5], "[0.5]"),
])
def test_number_refuses(value, shown):
    assert message(values.number, "probe.min_fill", value, lambda f: 0 <= f <= 1,
                   "a number in [0, 1]") == f"probe.min_fill={shown}; accepted: a number in [0, 1]"


def test_number_never_calls_ok_on_a_non_finite_value_and_takes_an_error_class():
    seen = []
    with pytest.raises(ConfigError):
        values.number("x", math.inf, lambda v: seen.append(v) or True, "finite")
    assert seen == []
    with pytest.raises(OwnError, match=r"^x=0; accepted: > 0$"):
        values.number("x", 0, lambda v: v > 0, "> 0", OwnError)


# ---------------------------------------------------------------- integer, optional_integer

def test_integer():
    assert values.integer("seed", 0, 0) == 0
    assert values.integer("n", -7) == -7  # no minimum: any integer
    assert message(values.integer, "seed", -1, 0) == "seed=-1; accepted: an integer >= 0"
    assert message(values.integer, "n", 2.0) == "n=2.0; accepted: an integer"
    assert message(values.integer, "n", True, 1) == "n=True; accepted: an integer >= 1"
    assert message(values.integer, "n", "3", 1) == "n='3'; accepted: an integer >= 1"
    assert message(values.integer, "n", None) == "n=None; accepted: an integer"
    with pytest.raises(OwnError, match=r"^n=0; accepted: an integer >= 1$"):
        values.integer("n", 0, 1, OwnError)


def test_optional_integer():
    assert values.optional_integer("k", None, 0) is None
    assert values.optional_integer("k", 0, 0) == 0
    assert values.optional_integer("k", 5) == 5
    assert message(values.optional_integer, "k", -1, 0) == \
        "k=-1; accepted: null or an integer >= 0"
    assert message(values.optional_integer, "k", False, 0) == \
        "k=False; accepted: null or an integer >= 0"
    assert message(values.optional_integer, "k", 1.5) == "k=1.5; accepted: null or an integer"
    with pytest.raises(OwnError, match=r"^k='x'; accepted: null or an integer >= 1$"):
        values.optional_integer("k", "x", 1, OwnError)


# ---------------------------------------------------------------- flag

def test_flag():
    assert values.flag("resume", True) is True and values.flag("resume", False) is False
    for bad, shown in (("off", "'off'"), ("true", "'true'"), (1, "1"), (0, "0"), (None, "None")):
        assert message(values.flag, "resume", bad) == f"resume={shown}; accepted: true, false"
    with pytest.raises(OwnError, match=r"^resume='maybe'; accepted: true, false$"):
        values.flag("resume", "maybe", OwnError)


# ---------------------------------------------------------------- text, optional_text

def test_text():
    assert values.text("model.path", "a/b") == "a/b"
    assert values.text("model.path", "") == ""
    assert message(values.text, "model.path", ["a"]) == \
        "model.path=['a'] is a list; accepted: a string"
    assert message(values.text, "model.path", 3) == "model.path=3 is a int; accepted: a string"
    assert values.optional_text("cache_dir", None) is None
    assert values.optional_text("cache_dir", "/tmp/x") == "/tmp/x"
    assert message(values.optional_text, "cache_dir", 2.5) == \
        "cache_dir=2.5 is a float; accepted: a string"
    with pytest.raises(OwnError, match=r"^k=None is a NoneType; accepted: a string$"):
        values.text("k", None, OwnError)


# ---------------------------------------------------------------- layer_list

def test_layer_list_accepts():
    assert values.layer_list("direction.layers", [3, 5]) == (3, 5)
    assert values.layer_list("direction.layers", (0,)) == (0,)
    assert values.layer_list("direction.layers", "auto", ("auto",)) == "auto"
    assert values.layer_list("intervention.layers", None, (None,)) is None


@pytest.mark.parametrize("value, allow, shown, accepted", [
    ([], (), "[]", "a non-empty list of layer numbers"),
    ("auto", (), "'auto'", "a non-empty list of layer numbers"),  # not allowed here
    ("3", ("auto",), "'3'", "'auto' or a non-empty list of layer numbers"),
    ([1, True], (None,), "[1, True]", "None or a non-empty list of layer numbers"),
    ((1, 2.0), (), "[1, 2.0]", "a non-empty list of layer numbers"),  # a tuple shown as a list
    (None, ("auto",), "None", "'auto' or a non-empty list of layer numbers"),
    (5, (), "5", "a non-empty list of layer numbers"),
])
def test_layer_list_refuses(value, allow, shown, accepted):
    assert message(values.layer_list, "direction.layers", value, allow) == \
        f"direction.layers={shown}; accepted: {accepted}"


def test_layer_list_allow_compares_type_as_well_as_value():
    # 0 == False and 1 == True: an allowed False must not let 0 through, nor the reverse
    with pytest.raises(ConfigError):
        values.layer_list("k", 0, (False,))
    with pytest.raises(OwnError, match=r"^k=\[\]; accepted: 'auto' or a non-empty list"):
        values.layer_list("k", [], ("auto",), OwnError)


# ---------------------------------------------------------------- names that become paths

REFUSED = ["../../etc", "a/b", "..", ".hidden", "/etc/passwd", "/", "-rf", "a\\b", "a\x00b", "",
           "x..y", "a b", "name\n", "_x", "ü", None, 3, ["a"]]


@pytest.mark.parametrize("value", REFUSED)
def test_path_name_refuses_what_is_not_a_plain_name(value):
    with pytest.raises(ValueError) as err:
        values.path_name("model.name", value)
    assert str(err.value) == (f"model.name={value!r} cannot name a file or folder; accepted: a plain "
                              "name of letters, digits, '.', '_' and '-', starting with a letter or digit")


@pytest.mark.parametrize("value", ["smollm2", "gemma3_270m", "SmolLM2-135M-Instruct.Q4_1.gguf", "v1.0",
                                   "0"])
def test_path_name_accepts_plain_names(value):
    assert values.path_name("model.name", value) == value


def test_path_name_raises_the_callers_error():
    class Mine(Exception):
        pass

    with pytest.raises(Mine, match="cache entry='../x'"):
        values.path_name("cache entry", "../x", Mine)
