"""``shown``: how a value the client chose is echoed in a message, a log line or a label."""

from __future__ import annotations

import time

import pytest

from service.core.errors import SHOWN_CHARS, shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("star", "'star'"),
        (None, "None"),
        (7, "7"),
        ("1", "'1'"),  # told apart from 1
        ([1, "a"], "[1, 'a']"),
    ],
)
def test_short_values_are_shown_whole_as_their_repr(value, expected):
    assert shown(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "x" * 20_000,
        "\x00" * 20_000,  # each one four characters in a repr
        [1] * 2_500_000,
        {"a" * 1000: ["b" * 1000] * 1000},
        b"x" * 20_000,
    ],
    ids=["string", "escapes", "long-list", "nested", "bytes"],
)
def test_every_value_is_at_most_the_limit_and_says_where_it_was_cut(value):
    text = shown(value)
    assert len(text) <= SHOWN_CHARS and "..." in text


def test_an_integer_too_long_to_format_is_shown_by_its_size():
    assert shown(10**5000) == "<an integer of 16610 bits>"  # Python refuses to format more than 4,300 digits


def test_a_huge_container_costs_nothing_to_show():
    """A 2.5-million-element shape took 0.15 s to format whole; cut as it is formatted, it takes microseconds."""
    shape = [1] * 2_500_000
    started = time.perf_counter()
    shown(shape)
    assert time.perf_counter() - started < 0.05


def test_unquoted_strings_for_log_fields_and_a_limit_of_ones_own():
    assert shown("/detect", quote=False) == "/detect"
    assert shown("a" * 300, quote=False) == "a" * (SHOWN_CHARS - 3) + "..."
    assert shown("a" * SHOWN_CHARS, quote=False) == "a" * SHOWN_CHARS, "exactly the limit is not cut"
    assert shown("n" * 1000, 255, quote=False) == "n" * 252 + "..."
