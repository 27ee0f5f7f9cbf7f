"""Layers that run weights stored in mint-mlx's extended formats inside an mlx-lm model.

Each mirrors the stock layer mlx-lm would use for a native format (``nn.QuantizedLinear``,
``nn.QuantizedEmbedding``, mlx-lm's ``QuantizedSwitchLinear``): same call signature, same
``bits``/``group_size``/``mode`` attributes, and the saved arrays (``weight``, ``scales``,
``biases`` and, for compact scales, ``super_scales``) held as frozen parameters under the names
they are saved with, so ``model.load_weights`` fills them with no renaming. The arithmetic is
:mod:`mint_mlx.runtime.kernels.ops` (Metal kernels on Apple GPUs, the float32 reference elsewhere); the
layers only hold arrays and route calls, so a format's layout is known in one place.

Every layer has ``dequantized_weight()``: the float32 weight it computes with, which is what
``mint_mlx.tools.evaluation.backends``'s ``dequant-fp32`` backend swaps in.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from mint_mlx.errors import MintError
from mint_mlx.formats import COMPACT, Format
from mint_mlx.runtime.kernels import ops

#: Names of the arrays an extended format saves, in file order (see Format.array_specs).
ARRAY_NAMES = ("weight", "scales", "biases", "super_scales")


class _ExtendedQuantized(nn.Module):
    """Shared state: the format and placeholders for the saved arrays until weights load."""

    def __init__(self, fmt: Format, shape: Sequence[int]):
        super().__init__()
        if not fmt.is_quantized or fmt.native or fmt.mode not in ("affine", COMPACT):
            raise MintError(f"{fmt.name} is not an extended format; use MLX's own layers for it")
        if not fmt.supports(shape):
            raise MintError(f"{fmt.name} cannot store a weight of shape {tuple(shape)}")
        self.fmt = fmt
        self.bits = fmt.bits
        self.group_size = fmt.group_size
        self.mode = fmt.mode
        # Placeholders with the saved shapes and dtypes ("float" ones in float16 until the real
        # arrays load): load_weights(strict=True) then checks every saved shape against them.
        for suffix, (array_shape, kind) in fmt.array_specs(shape).items():
            dtype = {"uint32": mx.uint32, "uint8": mx.uint8, "int8": mx.int8}.get(kind, mx.float16)
            setattr(self, suffix, mx.zeros(array_shape, dtype=dtype))

    def arrays(self) -> dict[str, mx.array]:
        """The saved arrays, as :mod:`mint_mlx.runtime.kernels.ops` takes them."""
        return {name: self[name] for name in ARRAY_NAMES if name in self}

    def dequantized_weight(self) -> mx.array:
        """The float32 weight these arrays represent (what every kernel approximates)."""
        return ops.dequantize(self.arrays(), self.fmt)

    @property
    def float_dtype(self) -> mx.Dtype:
        """The 16-bit dtype the model was saved in (the dtype of the float metadata)."""
        return self["super_scales" if self.mode == COMPACT else "scales"].dtype

    def _extra_repr(self) -> str:
        return f"format={self.fmt.name}"


class ExtendedQuantizedLinear(_ExtendedQuantized):
    """``nn.QuantizedLinear`` for an extended format: ``y = x @ W.T (+ bias)``."""

    def __init__(self, input_dims: int, output_dims: int, fmt: Format, bias: bool = True):
        super().__init__(fmt, (output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = ops.quantized_matmul(x, self.arrays(), self.fmt)
        if "bias" in self:
            y = y + self["bias"]
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format) -> ExtendedQuantizedLinear:
        """An empty layer with ``linear``'s shape (the saved arrays load into it)."""
        output_dims, input_dims = linear.weight.shape
        return cls(input_dims, output_dims, fmt, bias="bias" in linear)


class ExtendedQuantizedEmbedding(_ExtendedQuantized):
    """``nn.QuantizedEmbedding`` for an extended format.

    A lookup dequantizes only the gathered rows. ``as_linear`` multiplies by the whole table,
    for models whose output head is tied to the embedding.
    """

    def __init__(self, num_embeddings: int, dims: int, fmt: Format):
        super().__init__(fmt, (num_embeddings, dims))
        self.num_embeddings = num_embeddings
        self.dims = dims
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1)
        rows = {name: a[flat] for name, a in self.arrays().items()}
        out = ops.dequantize(rows, self.fmt).astype(self.float_dtype)
        return out.reshape(*x.shape, self.dims)

    def as_linear(self, x: mx.array) -> mx.array:
        """Use the embedding table as a linear layer (tied input and output embeddings)."""
        return ops.quantized_matmul(x, self.arrays(), self.fmt)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, fmt: Format) -> ExtendedQuantizedEmbedding:
        num_embeddings, dims = embedding.weight.shape
        return cls(num_embeddings, dims, fmt)


class ExtendedQuantizedSwitchLinear(_ExtendedQuantized):
    """mlx-lm's ``QuantizedSwitchLinear`` for an extended format: a stack of expert matrices
    (E, out, in), each token multiplied by the experts its router picked."""

    def __init__(
        self, input_dims: int, output_dims: int, num_experts: int, fmt: Format, bias: bool = True
    ):
        super().__init__(fmt, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @property
    def input_dims(self) -> int:
        return int(self["scales"].shape[2]) * self.group_size

    @property
    def output_dims(self) -> int:
        return int(self["weight"].shape[1])

    @property
    def num_experts(self) -> int:
        return int(self["weight"].shape[0])

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = ops.gather_quantized_matmul(
            x, self.arrays(), self.fmt, indices, sorted_indices=sorted_indices
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, fmt: Format) -> ExtendedQuantizedSwitchLinear:
        num_experts, output_dims, input_dims = layer.weight.shape
        return cls(input_dims, output_dims, num_experts, fmt, bias="bias" in layer)


#: The layers of this module, for isinstance checks (verify_saved, evaluate).
EXTENDED_LAYERS = (
    ExtendedQuantizedLinear,
    ExtendedQuantizedEmbedding,
    ExtendedQuantizedSwitchLinear,
)


def extended_layer(module: nn.Module, fmt: Format, path: str = "") -> nn.Module:
    """The extended-format twin of a float layer, empty until the saved weights load.

    Raises :class:`MintError` for a layer type no extended layer mirrors (the saved config then
    does not fit this model).
    """
    if isinstance(module, SwitchLinear):
        return ExtendedQuantizedSwitchLinear.from_switch_linear(module, fmt)
    if isinstance(module, nn.Embedding):
        return ExtendedQuantizedEmbedding.from_embedding(module, fmt)
    if isinstance(module, nn.Linear):
        return ExtendedQuantizedLinear.from_linear(module, fmt)
    raise MintError(
        f"{path or 'a layer'} is a {type(module).__name__}, which has no {fmt.name} layer; "
        "only Linear, Embedding and SwitchLinear layers take extended formats"
    )
