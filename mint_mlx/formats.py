"""The registry of storage formats a weight tensor can be saved in, with exact byte costs.

A format is one joint choice of (mode, bits, group size). Its byte cost is what the saved
safetensors data will hold for that tensor: packed uint32 weights plus scales (and biases for
affine) in their dtype. The allocator trades these exact costs against measured distortion, so
`nbytes` must agree with what `mx.quantize` really produces (a unit test checks every format).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

#: Affine (scale + bias per group) configurations that stock MLX kernels serve.
NATIVE_AFFINE_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
NATIVE_AFFINE_GROUPS: tuple[int, ...] = (32, 64, 128)

#: Microscaling float modes in MLX: mode -> (bits, group size). Their scales are one byte each.
NATIVE_FP_MODES: dict[str, tuple[int, int]] = {
    "mxfp4": (4, 32),
    "nvfp4": (4, 16),
    "mxfp8": (8, 32),
}

PASSTHROUGH = "passthrough"

#: Extended formats (need mint-mlx's kernels to run; ``--formats extended``): affine at group
#: sizes MLX lacks, and affine with compact scales: each group's scale and bias stored in 8 bits
#: against one 16-bit (scale, bias) pair per super-block of SUPER_BLOCK weights of a row.
EXTENDED_AFFINE_GROUPS: tuple[int, ...] = (16, 256)
COMPACT_GROUPS: tuple[int, ...] = (16, 32, 64)
COMPACT = "affine_cs"
SUPER_BLOCK = 256


def compact_groups_per_block(width: int, group_size: int) -> int:
    """Groups that share one 16-bit (scale, bias) step pair in a row of ``width``: as many as
    fit in SUPER_BLOCK weights, fewer where that does not divide the row (576 -> blocks of 192)."""
    groups = width // group_size
    most = max(1, SUPER_BLOCK // group_size)
    return max(d for d in range(1, most + 1) if groups % d == 0)


@dataclass(frozen=True, order=True)
class Format:
    """One way to store a weight tensor.

    ``mode`` is an MLX quantization mode (``affine``, ``mxfp4``, ``nvfp4``, ``mxfp8``) or
    ``passthrough`` (kept in the 16-bit output dtype). ``native`` means stock mlx-lm loads it.
    """

    mode: str
    bits: int
    group_size: int
    native: bool = True

    @property
    def name(self) -> str:
        """Stable identifier used in caches, plans and tables, e.g. ``affine-4-g64``.

        The 16-bit passthrough format is named ``fp16`` whatever the output dtype: it is stored
        in that dtype (bfloat16 for a bfloat16 model), not as float16. The name is kept because
        it is written into mint_plan.json and analysis caches."""
        if self.mode == PASSTHROUGH:
            return "fp16" if self.bits == 16 else f"fp{self.bits}"
        if self.mode == "affine":
            return f"affine-{self.bits}-g{self.group_size}"
        if self.mode == COMPACT:
            return f"affine-{self.bits}-g{self.group_size}-cs"
        return self.mode

    @property
    def is_quantized(self) -> bool:
        return self.mode != PASSTHROUGH

    def supports(self, shape: Sequence[int]) -> bool:
        """Whether this format can store a tensor of ``shape`` (groups run along the last axis)."""
        if not self.is_quantized:
            return True
        width = shape[-1]
        if width % self.group_size != 0:
            return False
        # Packing needs a whole number of uint32 words per row.
        return (width * self.bits) % 32 == 0

    def array_specs(
        self, shape: Sequence[int], dtype_bytes: int = 2
    ) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shapes and dtypes of the arrays saved for one tensor: suffix -> (shape, dtype name).

        Suffixes are ``weight``, ``scales`` and ``biases`` as mlx-lm names them. ``dtype name`` is
        ``float`` for the 16-bit output dtype, else ``uint32``/``uint8``.
        """
        shape = tuple(int(s) for s in shape)
        if not self.is_quantized:
            return {"weight": (shape, "float")}
        lead, width = shape[:-1], shape[-1]
        packed = (*lead, width * self.bits // 32)
        groups = (*lead, width // self.group_size)
        if self.mode == "affine":
            return {
                "weight": (packed, "uint32"),
                "scales": (groups, "float"),
                "biases": (groups, "float"),
            }
        if self.mode == COMPACT:
            return {
                "weight": (packed, "uint32"),
                "scales": (groups, "uint8"),
                "biases": (groups, "int8"),
                "super_scales": (
                    (
                        *lead,
                        width
                        // self.group_size
                        // compact_groups_per_block(width, self.group_size),
                        2,
                    ),
                    "float",
                ),
            }
        return {"weight": (packed, "uint32"), "scales": (groups, "uint8")}

    def nbytes(self, shape: Sequence[int], dtype_bytes: int = 2) -> int:
        """Exact bytes of tensor data this format saves for a tensor of ``shape``."""
        sizes = {"float": dtype_bytes, "uint32": 4, "uint8": 1, "int8": 1}
        return sum(prod(s) * sizes[d] for s, d in self.array_specs(shape, dtype_bytes).values())

    def bits_per_weight(self, dtype_bytes: int = 2) -> float:
        """Storage cost per weight including scales and biases (for tables and budgets)."""
        if not self.is_quantized:
            return 8.0 * dtype_bytes
        width = max(self.group_size, SUPER_BLOCK) * 32  # any width the format supports
        return 8.0 * self.nbytes((1, width), dtype_bytes) / width

    def quantization_entry(self) -> dict[str, int | str] | bool:
        """The per-layer entry written into ``config.json`` (``False`` keeps the layer float)."""
        if not self.is_quantized:
            return False
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def native_formats() -> list[Format]:
    """Every format stock mlx-lm can load: affine bits x groups, mxfp4, nvfp4, mxfp8, 16-bit."""
    formats = [Format("affine", b, g) for b in NATIVE_AFFINE_BITS for g in NATIVE_AFFINE_GROUPS]
    formats += [Format(mode, b, g) for mode, (b, g) in NATIVE_FP_MODES.items()]
    formats.append(Format(PASSTHROUGH, 16, 0))
    return formats


def extended_formats() -> list[Format]:
    """Formats beyond stock MLX: affine at groups 16 and 256, and compact-scale affine."""
    formats = [
        Format("affine", b, g, native=False)
        for b in NATIVE_AFFINE_BITS
        for g in EXTENDED_AFFINE_GROUPS
    ]
    formats += [
        Format(COMPACT, b, g, native=False) for b in NATIVE_AFFINE_BITS for g in COMPACT_GROUPS
    ]
    return formats


def paper_formats() -> list[Format]:
    """The eight configurations of the published MINT method: (2,32) (3,64) (4,32) (4,64) (4,128)
    (8,64) (8,128) affine, and 16-bit."""
    pairs = [(2, 32), (3, 64), (4, 32), (4, 64), (4, 128), (8, 64), (8, 128)]
    return [Format("affine", b, g) for b, g in pairs] + [Format(PASSTHROUGH, 16, 0)]


#: Candidate sets ``--formats`` chooses between: only what stock mlx-lm loads, or that plus the
#: extended formats (an output that uses any of them loads with ``mint_mlx.load``, not stock mlx-lm).
FORMAT_SETS: tuple[str, ...] = ("native", "extended")


def formats_for(objective: str, scale_method: str = "rtn", formats: str = "native") -> list[Format]:
    """The candidate set an objective allocates over.

    With fitted affine scales the microscaling float modes (mxfp4, nvfp4, mxfp8) are left out:
    across the full budget sweep of both testbeds they were never chosen once affine scales
    are fitted (fitted affine 4-bit g64 beats nvfp4 at the same 4.5 bits), while on a CPU they
    cost about a third of the whole analysis. With MLX's round-to-nearest scales they do win
    tensors (the fisher/RTN ablation gives them ~40% of the parameters), so they stay there.
    HQQ (``scales="hqq"``) is a fitted method and gets the fitted candidates, so its rows
    differ from the default's only in how the affine scales are chosen.

    ``formats="extended"`` adds :func:`extended_formats` to that set, so the allocator can only
    do better at a given budget, except affine group 16 with 16-bit scales: compact scales at
    group 16 store the same groups for 1 bit per weight less, and across both testbeds'
    frontier budgets the allocator never chose the full-scale version (dropping it left all ten
    plans byte-identical; benchmarks/RESULTS.md). It stays in the registry, so such files load.
    Paper mode is the published method and keeps its eight configurations whatever
    ``formats`` says (the planner notes that).
    """
    if formats not in FORMAT_SETS:
        raise ValueError(f"unknown format set {formats!r}; use one of {', '.join(FORMAT_SETS)}")
    if objective == "paper":
        return paper_formats()
    if scale_method in ("optimized", "hqq", "gptq"):  # fitted too: optimized's candidates
        base = [f for f in native_formats() if f.mode in ("affine", PASSTHROUGH)]
    else:
        base = native_formats()
    if formats == "native":
        return base
    return base + [f for f in extended_formats() if not (f.mode == "affine" and f.group_size == 16)]


def format_from_entry(entry: dict[str, int | str] | bool) -> Format:
    """Inverse of :meth:`Format.quantization_entry` (``mode`` defaults to affine, as in MLX)."""
    if entry is False:
        return Format(PASSTHROUGH, 16, 0)
    if not isinstance(entry, dict):
        raise ValueError(f"not a quantization entry: {entry!r}")
    mode = str(entry.get("mode", "affine"))
    bits, group = int(entry["bits"]), int(entry["group_size"])
    native = mode != COMPACT and not (mode == "affine" and group in EXTENDED_AFFINE_GROUPS)
    return Format(mode, bits, group, native)


def by_name(formats: Sequence[Format]) -> dict[str, Format]:
    return {f.name: f for f in formats}


@functools.cache
def _registry() -> dict[str, Format]:
    return by_name(native_formats() + extended_formats())


def format_by_name(name: str) -> Format:
    """Look a format (native or extended) up by its :attr:`Format.name` (the registry is built
    once: the allocator looks up every candidate of every tensor at each budget)."""
    table = _registry()
    if name not in table:
        raise KeyError(f"unknown format {name!r}; known: {', '.join(table)}")
    return table[name]
