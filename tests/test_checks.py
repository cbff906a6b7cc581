"""The shared argument checks (``headwise._checks``): types are refused, never coerced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headwise
from headwise import patterns as P
from headwise._checks import (
    ArgumentTypeError,
    Unsupported,
    check_bool,
    check_choice,
    check_int,
    check_ints,
    check_real,
)


def test_error_classes_stay_catchable_as_value_errors():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    assert issubclass(Unsupported, ValueError)
    assert headwise.ArgumentTypeError is ArgumentTypeError and headwise.Unsupported is Unsupported


@pytest.mark.parametrize("value", [True, 2.0, "2", None, torch.tensor(2.0)])
def test_check_int_refuses_what_is_not_an_integer(value):
    with pytest.raises(ArgumentTypeError, match="size must be an integer"):
        check_int("size", value)


def test_check_int_takes_integers_of_any_kind_and_checks_bounds():
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("n", 2**80) == 2**80
    with pytest.raises(ValueError, match="n must be an integer >= 1; got 0"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="n must be an integer <= 4; got 5"):
        check_int("n", 5, maximum=4)


@pytest.mark.parametrize("values", [[2.5, 1], [True, 2], torch.tensor([1.0, 2.0]), "12", 3])
def test_check_ints_refuses_floats_bools_and_scalars(values):
    with pytest.raises(ArgumentTypeError, match="lengths"):
        check_ints("lengths", values)


def test_check_ints_takes_integer_tensors():
    assert check_ints("lengths", torch.tensor([3, 5])) == (3, 5)


@pytest.mark.parametrize("value", ["no", 0, 1, None, np.bool_(True)])
def test_check_bool_takes_only_bools(value):
    with pytest.raises(ArgumentTypeError, match="causal must be True or False"):
        check_bool("causal", value)


@pytest.mark.parametrize(
    "value, error",
    [
        ("0.5", ArgumentTypeError),
        (True, ArgumentTypeError),
        (torch.ones(2), ArgumentTypeError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (torch.tensor(0.5, requires_grad=True), ArgumentTypeError),
    ],
)
def test_check_real_refuses(value, error):
    with pytest.raises(error, match="scale"):
        check_real("scale", value)


def test_check_real_takes_numbers_and_plain_one_element_tensors():
    assert check_real("scale", np.float32(0.5)) == 0.5
    assert check_real("scale", torch.tensor([0.25])) == 0.25
    with pytest.raises(ValueError, match="must be > 0"):
        check_real("scale", 0.0, positive=True)


def test_a_learnable_scale_is_refused_not_cut_from_its_gradient():
    q = torch.randn(1, 6, 2, 4)
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(TypeError, match="requires grad"):
        headwise.attention(q, q, q, P.causal(), scale=scale)


def test_check_choice():
    assert check_choice("align", "top_left", ("bottom_right", "top_left")) == "top_left"
    with pytest.raises(ValueError, match="align must be one of"):
        check_choice("align", ["top_left"], ("bottom_right", "top_left"))
