"""The post-save check: load a written model directory the way its users will, and compare every
module with the plan, before the directory is published (:mod:`mint_mlx.convert`).

It lives with the runtime because it needs the loaders (stock mlx-lm's, and
:func:`mint_mlx.runtime.load.load_model` for extended formats); the save step itself
(:mod:`mint_mlx.output.save`) only writes files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mint_mlx.allocation.allocate import Plan
from mint_mlx.errors import SaveCheckError
from mint_mlx.formats import Format, format_from_entry
from mint_mlx.quant.experts import collapse, needs_mint
from mint_mlx.runtime.expert_layers import PerExpertSwitchLinear
from mint_mlx.runtime.layers import EXTENDED_LAYERS
from mint_mlx.runtime.load import load_model as mint_load_model
from mint_mlx.safetensors_io import read_header


def verify_saved(directory: Path, plan: Plan) -> None:
    """Load the directory the way its users will and check every module against the plan.

    A native plan loads through stock mlx-lm's ``load_model`` (the promise is that no mint-mlx
    import is needed); a plan with extended formats through :func:`mint_mlx.runtime.load.load_model`.
    Catches the classic silent failure (a planned layer left unquantized because a default
    config skipped it) and any byte overrun, before the directory is published.
    """
    loader: Callable[..., tuple[nn.Module, dict[str, Any]]]
    extra_types: tuple[type[nn.Module], ...] = ()
    if needs_mint(plan.formats):
        loader, who = mint_load_model, "mint_mlx.load"
        extra_types = (*EXTENDED_LAYERS, PerExpertSwitchLinear)
    else:
        loader, who = mlx_utils.load_model, "mlx-lm"

    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        read_header(f)
    size = sum(f.stat().st_size for f in files)
    if size > plan.budget:
        raise SaveCheckError(f"saved weights take {size} bytes, over the budget of {plan.budget}")
    if plan.total_bytes and size != plan.total_bytes:
        raise SaveCheckError(f"saved weights take {size} bytes, the plan said {plan.total_bytes}")
    try:
        model, _ = loader(directory, lazy=True, strict=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the output is unusable
        raise SaveCheckError(
            f"the saved model does not load in {who} ({type(e).__name__}: {e})"
        ) from e
    _check_modules(model, plan, (*QUANTIZED_TYPES, *extra_types))


#: The layers stock mlx-lm loads a quantized module as.
QUANTIZED_TYPES: tuple[type[nn.Module], ...] = (
    nn.QuantizedLinear,
    nn.QuantizedEmbedding,
    QuantizedSwitchLinear,
)


def _check_modules(
    model: nn.Module, plan: Plan, quantized_types: tuple[type[nn.Module], ...]
) -> None:
    """Every planned module is in ``model``, quantized in its planned format or not at all."""
    modules: dict[str, Any] = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    for path, fmt in collapse(plan.formats).items():
        module = modules.get(path)
        if module is None:
            raise SaveCheckError(f"planned module {path} is missing from the loaded model")
        if not isinstance(fmt, Format):  # per-expert groups
            if getattr(module, "groups", None) != fmt:
                raise SaveCheckError(f"{path} was planned per expert but loads differently")
            continue
        if fmt.is_quantized:
            if not isinstance(module, quantized_types):
                raise SaveCheckError(f"{path} was planned as {fmt.name} but loads unquantized")
            got = format_from_entry(
                {
                    "bits": module.bits,
                    "group_size": module.group_size,
                    "mode": getattr(module, "mode", "affine"),
                }
            )
            if got != fmt:
                raise SaveCheckError(f"{path} was planned as {fmt.name} but loads as {got.name}")
        elif isinstance(module, quantized_types):
            raise SaveCheckError(f"{path} was planned in 16-bit but loads quantized")
