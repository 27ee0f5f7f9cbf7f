from __future__ import annotations

import pytest

from mint_mlx.errors import BudgetError
from mint_mlx.sizes import format_size, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("5.5GB", 5_500_000_000),
        ("5GiB", 5 * 2**30),
        ("800MB", 800_000_000),
        ("19 GB", 19 * 10**9),
        ("123", 123),
        ("1.5e3KB", 1_500_000),
        ("2kib", 2048),
    ],
)
def test_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-3GB", "0MB", "five"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(BudgetError, match="5.5GB"):
        parse_size(text)


def test_format_round_up_is_enough() -> None:
    n = 1_234_567
    assert parse_size(format_size(n, round_up=True)) >= n
    assert format_size(n) == "1.23MB"
