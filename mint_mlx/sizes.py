"""Human byte sizes: parse ``19GB``, ``19GiB``, ``500MB``, ``1.5e9``; print them back."""

from __future__ import annotations

import math
import re

from mint_mlx.errors import BudgetError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: decimal units (KB, MB, GB, TB = powers of 1000) or binary (KiB ... TiB).

    Raises :class:`BudgetError` for anything else, naming the accepted forms.
    """
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).upper() not in _UNITS:
            raise BudgetError(f"cannot read size {text!r}; write it like 5.5GB, 5GiB or 800MB")
        value, unit = float(m.group(1)), m.group(2).upper()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise BudgetError(f"size {text!r} must be positive; write it like 5.5GB, 5GiB or 800MB")
    return int(size)


def format_size(nbytes: int | float, digits: int = 2, round_up: bool = False) -> str:
    """``1234567`` -> ``1.23MB`` (decimal units, as disk sizes and the hub show them).

    ``round_up`` rounds away from zero at the last digit, so that a printed minimum is really
    enough when passed back as a budget.
    """
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            if round_up:
                value = math.ceil(value * 10**digits) / 10**digits
            return f"{value:.{digits}f}{unit}"
    return f"{int(math.ceil(nbytes) if round_up else nbytes)}B"
