"""Checks of JSON-able values (``AttentionSegLib.json_fields``), shared by the server's arguments and the
settings dataclasses a user or a client sends."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from AttentionSegLib.json_fields import check_fields, is_int, is_number


def test_integers_and_numbers_are_not_bools_and_numbers_are_finite() -> None:
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(-2.5) and not is_number(False)
    assert not is_number(float("nan")) and not is_number(float("inf")) and not is_number("1")


@dataclass
class Knobs:
    rate: float = 1.0
    steps: int = 3
    on: bool = True
    mode: str = "a"
    roi: tuple[int, ...] = (8, 8)
    margins: list[float] | None = None


@pytest.mark.parametrize(("values", "message"), [
    ({"rate": "1"}, "knob 'rate' must be a number, got '1'"),
    ({"steps": 2.0}, "knob 'steps' must be an integer"),
    ({"on": 0}, "knob 'on' must be true or false"),
    ({"mode": 1}, "knob 'mode' must be str"),
    ({"roi": [8, 8.5]}, "knob 'roi' must be a list of integers"),
    ({"margins": [0.1, "x"]}, "knob 'margins' must be a list of numbers"),
    ({"rate": None}, "knob 'rate' may not be null"),
])
def test_a_value_that_does_not_fit_its_field_is_named(values: dict, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_fields(Knobs, values, "knob")
    assert message in str(refused.value)


def test_values_that_fit_pass() -> None:
    check_fields(Knobs, {"rate": 2, "steps": 4, "on": False, "mode": "b", "roi": [16, 32], "margins": None},
                 "knob")
    check_fields(Knobs, {"margins": [0.05, 1]}, "knob")
