"""The settings stock ``mlx_lm convert -q`` offers: affine bits x group sizes, the float modes and
the ``mixed_*`` recipes, each with its name and command line.

Why a module of its own: the conversion path prices these settings (:mod:`mint_mlx.allocation.stock`)
and the tools build them with mlx-lm (:mod:`mint_mlx.tools.baselines`); both read the one list.
"""

from __future__ import annotations

from dataclasses import dataclass

from mint_mlx.errors import MintError
from mint_mlx.formats import NATIVE_AFFINE_BITS, NATIVE_AFFINE_GROUPS, NATIVE_FP_MODES

#: mlx-lm's mixed-precision recipes we compare with (``mlx_lm.convert --quant-predicate``).
RECIPES: tuple[str, ...] = ("mixed_3_6", "mixed_4_6")
RECIPE_GROUPS: tuple[int, ...] = (64, 32)


class BaselineError(MintError):
    """A baseline cannot be built as asked (unknown name, existing output)."""


@dataclass(frozen=True)
class Baseline:
    """One stock mlx-lm quantization setting.

    ``name`` is stable and used as a key in results: ``affine-4-g64``, ``mxfp4``, ``nvfp4``,
    ``mxfp8``, ``mixed_3_6-g64``.
    """

    name: str
    mode: str  # affine | mxfp4 | nvfp4 | mxfp8
    bits: int
    group_size: int
    recipe: str | None = None  # mlx-lm quant predicate recipe (affine only)

    @property
    def command(self) -> str:
        """The equivalent ``mlx_lm.convert`` command line (for tables and READMEs)."""
        cmd = "mlx_lm.convert -q"
        if not self.recipe:  # a recipe sets every layer's bits itself
            cmd += f" --q-bits {self.bits}"
        cmd += f" --q-group-size {self.group_size}"
        if self.mode != "affine":
            cmd += f" --q-mode {self.mode}"
        if self.recipe:
            cmd += f" --quant-predicate {self.recipe}"
        return cmd


def stock_baselines() -> list[Baseline]:
    """Every stock setting: affine bits x groups, the fp modes at their mlx-lm default groups,
    and the ``mixed_*`` recipes at groups 64 and 32."""
    out = [
        Baseline(f"affine-{b}-g{g}", "affine", b, g)
        for b in NATIVE_AFFINE_BITS
        for g in NATIVE_AFFINE_GROUPS
    ]
    out += [Baseline(mode, mode, b, g) for mode, (b, g) in NATIVE_FP_MODES.items()]
    out += [
        # bits is the recipe's low width; mlx-lm writes an explicit per-layer entry for every layer
        Baseline(f"{r}-g{g}", "affine", int(r.split("_")[1]), g, recipe=r)
        for r in RECIPES
        for g in RECIPE_GROUPS
    ]
    return out


def baseline_by_name(name: str) -> Baseline:
    table = {b.name: b for b in stock_baselines()}
    if name not in table:
        raise BaselineError(f"unknown baseline {name!r}; known: {', '.join(table)}")
    return table[name]
