"""One declaration per Metal kernel, shared by the Apple GPU path and the Linux CPU emulator.

A :class:`KernelSpec` holds exactly what ``mx.fast.metal_kernel`` takes (name, input and output
names, body, header). On a Mac :meth:`KernelSpec.metal_kernel` builds the MLX kernel from it; on
Linux ``mint_mlx.tools.emulator.emulate`` compiles the very source MLX would generate from it. To make that
claim checkable, :meth:`KernelSpec.metal_source` reproduces MLX's source generation
(``write_signature`` and the kernel naming in ``mlx/backend/common/metal_kernel.cpp``), quirks
included, and the tests compare it byte for byte with the source MLX itself records when a kernel
call is exported.

A :class:`KernelCall` is one launch (inputs, output shapes and dtypes, grid, threadgroup, template
arguments), so that a kernel's launch rule is written once and used by both paths.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

#: Where the kernel sources live: ``metal/*.metal`` at the repository root, reached through the
#: package's ``mint_mlx/metal`` link (a wheel holds a copy there, so installed packages find them).
METAL_DIR = Path(__file__).resolve().parent.parent / "metal"

#: Marker line in a ``.metal`` file: the header is what comes before it, the body what follows.
BODY_MARKER = "// @mint:body"

#: MLX's list of Metal attributes for custom kernels, in its order, with their types. An attribute
#: is added to the signature when its name occurs anywhere in the body (a substring test).
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

#: Inputs with fewer elements than this go to the ``constant`` address space (MLX's rule).
MAX_CONSTANT_ARRAY_SIZE = 8

_MX_TYPE_STRINGS: dict[Any, str] = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float64: "double",
    mx.complex64: "complex64_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}

_NP_TYPE_STRINGS: dict[np.dtype, str] = {
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "float16_t",
    np.dtype(np.float64): "double",
    np.dtype(np.complex64): "complex64_t",
    np.dtype(np.bool_): "bool",
    np.dtype(np.int8): "int8_t",
    np.dtype(np.int16): "int16_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.uint16): "uint16_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.uint64): "uint64_t",
}

TYPE_STRINGS: frozenset[str] = frozenset(_MX_TYPE_STRINGS.values())


def type_string(dtype: Any) -> str:
    """MLX's Metal type name for a dtype (``mx.float16`` -> ``"float16_t"``).

    Accepts MLX dtypes, NumPy dtypes and type names already in MLX's spelling, so that callers can
    describe bfloat16 (which NumPy lacks) as ``mx.bfloat16`` or ``"bfloat16_t"``.
    """
    if isinstance(dtype, str):
        if dtype in TYPE_STRINGS:
            return dtype
        dtype = np.dtype(dtype)
    if isinstance(dtype, mx.Dtype):
        return _MX_TYPE_STRINGS[dtype]
    np_dtype = np.dtype(dtype)
    if np_dtype not in _NP_TYPE_STRINGS:
        raise TypeError(f"no Metal type for dtype {dtype!r}")
    return _NP_TYPE_STRINGS[np_dtype]


@dataclass(frozen=True)
class ArgInfo:
    """What MLX's generated signature depends on for one input: its type and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def arg_info(x: Any) -> ArgInfo:
    """Describe an input as MLX would see it (Python scalars become 0-d int32/float32/bool)."""
    if isinstance(x, ArgInfo):
        return x
    if isinstance(x, mx.array):
        return ArgInfo(type_string(x.dtype), tuple(x.shape))
    if isinstance(x, np.ndarray):
        return ArgInfo(type_string(x.dtype), tuple(x.shape))
    if isinstance(x, bool):
        return ArgInfo("bool", ())
    if isinstance(x, int):
        return ArgInfo("int32_t", ())
    if isinstance(x, float):
        return ArgInfo("float", ())
    raise TypeError(f"unsupported kernel input of type {type(x).__name__}")


def _template_kind(value: Any) -> str:
    # bool before int: bool is an int subclass in Python, and MLX maps it to a bool parameter.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    type_string(value)  # raises if it is not a dtype
    return "typename"


def template_value(value: Any) -> str:
    """A template argument as MLX writes it into the source (bools as 1/0, dtypes by name)."""
    kind = _template_kind(value)
    if kind == "bool":
        return "1" if value else "0"
    if kind == "int":
        return str(int(value))
    return type_string(value)


@dataclass(frozen=True)
class KernelCall:
    """One launch of a kernel: what ``mx.fast.metal_kernel``'s returned function takes."""

    inputs: tuple[Any, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[Any, ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: tuple[tuple[str, Any], ...] = ()
    init_value: float | None = None


@dataclass(frozen=True)
class KernelSpec:
    """The one declaration of a Metal kernel.

    ``source`` is the body and ``header`` the code before the generated signature, exactly as
    ``mx.fast.metal_kernel`` takes them. ``template_params`` names the template parameters every
    call must pass, in order (MLX itself accepts anything; checking here catches a call that would
    compile a different kernel). ``origin``/``header_line``/``body_line`` say where the text came
    from, so that compiler messages and emulator reports point into the ``.metal`` file.
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""
    template_params: tuple[str, ...] = ()
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False
    origin: str | None = field(default=None, compare=False)
    header_line: int = field(default=1, compare=False)
    body_line: int = field(default=1, compare=False)

    @classmethod
    def from_metal_file(
        cls,
        path: str | Path,
        *,
        input_names: Sequence[str],
        output_names: Sequence[str],
        name: str | None = None,
        template_params: Sequence[str] = (),
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        defines: Sequence[tuple[str, int]] = (),
        includes: Sequence[str | Path] = (),
    ) -> KernelSpec:
        """Read a ``.metal`` file: header, then a ``// @mint:body`` line, then the body.

        A relative path is taken relative to :data:`METAL_DIR`. ``defines`` (``#define NAME
        value`` lines) and the text of ``includes`` (other ``.metal`` files, no body marker) are
        put before the file's header, so several kernels can be declared from one source and share
        helpers: MLX compiles a kernel from strings, so a ``#include`` of our own files could not
        work on a Mac. ``#line`` directives keep compiler messages pointing into the right file.
        """
        p = _metal_path(path)
        lines = p.read_text().splitlines(keepends=True)
        marker = [i for i, line in enumerate(lines) if line.strip() == BODY_MARKER]
        if len(marker) != 1:
            raise ValueError(f"{p}: expected exactly one '{BODY_MARKER}' line, found {len(marker)}")
        m = marker[0]
        prefix = "".join(f"#define {k} {int(v)}\n" for k, v in defines)
        for inc in includes:
            ip = _metal_path(inc)
            text = ip.read_text()
            if BODY_MARKER in text:
                raise ValueError(f"{ip}: an included file must not have a body marker")
            prefix += f'#line 1 "{ip}"\n' + text + ("" if text.endswith("\n") else "\n")
        if prefix:
            prefix += f'#line 1 "{p}"\n'
        return cls(
            name=name or p.stem,
            input_names=tuple(input_names),
            output_names=tuple(output_names),
            source="".join(lines[m + 1 :]),
            header=prefix + "".join(lines[:m]),
            template_params=tuple(template_params),
            ensure_row_contiguous=ensure_row_contiguous,
            atomic_outputs=atomic_outputs,
            origin=str(p),
            header_line=1,
            body_line=m + 2,
        )

    # ---- what MLX derives from the body -------------------------------------------------------

    def shape_infos(self) -> list[tuple[bool, bool, bool]]:
        """Per input: whether the body mentions ``<name>_shape``, ``_strides``, ``_ndim``."""
        return [
            (f"{n}_shape" in self.source, f"{n}_strides" in self.source, f"{n}_ndim" in self.source)
            for n in self.input_names
        ]

    def attributes(self) -> list[tuple[str, str]]:
        """The Metal attributes MLX adds to the signature (name, type), in MLX's order."""
        return [(a, t) for a, t in METAL_ATTRIBUTES if a in self.source]

    def check_template(self, template: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Validate template arguments against ``template_params``; returns them as a list."""
        args = [(str(k), v) for k, v in template]
        if self.template_params and tuple(k for k, _ in args) != self.template_params:
            raise ValueError(
                f"kernel {self.name!r} takes template parameters {list(self.template_params)}, "
                f"got {[k for k, _ in args]}"
            )
        for k, v in args:
            _template_kind(v)
            if not k.isidentifier():
                raise ValueError(f"template parameter name {k!r} is not an identifier")
        return args

    # ---- MLX's source generation ----------------------------------------------------------------

    def kernel_name(
        self,
        inputs: Sequence[Any],
        output_dtypes: Sequence[Any],
        template: Sequence[tuple[str, Any]] = (),
    ) -> str:
        """The Metal function name MLX gives this instantiation."""
        infos = [arg_info(x) for x in inputs]
        name = "custom_kernel_" + self.name
        if template:
            name += "_" + _template_hash(_write_template(template))
        for info in infos:
            name += "_" + info.dtype
            if info.ndim == 0:
                name += "s"
            elif info.size < MAX_CONSTANT_ARRAY_SIZE:
                name += "c"
        for dt in output_dtypes:
            name += "_" + type_string(dt)
        return name

    def signature_params(
        self, inputs: Sequence[Any], output_dtypes: Sequence[Any]
    ) -> list[tuple[str, str, str]]:
        """The parameters of the generated signature, as (kind, C type, name).

        kind is one of ``input``, ``scalar``, ``shape``, ``strides``, ``ndim``, ``output``,
        ``attribute``; the C types are MLX's, address spaces included.
        """
        infos = [arg_info(x) for x in inputs]
        self._check_counts(infos, output_dtypes)
        params: list[tuple[str, str, str]] = []
        for name, info, (shape, strides, ndim) in zip(
            self.input_names, infos, self.shape_infos(), strict=True
        ):
            location = "constant" if info.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            if info.ndim == 0:
                params.append(("scalar", f"const {location} {info.dtype}&", name))
                continue
            params.append(("input", f"const {location} {info.dtype}*", name))
            if shape:
                params.append(("shape", "const constant int*", f"{name}_shape"))
            if strides:
                params.append(("strides", "const constant int64_t*", f"{name}_strides"))
            if ndim:
                params.append(("ndim", "const constant int&", f"{name}_ndim"))
        for name, dt in zip(self.output_names, output_dtypes, strict=True):
            t = type_string(dt)
            t = f"atomic<{t}>" if self.atomic_outputs else t
            params.append(("output", f"device {t}*", name))
        for attr, t in self.attributes():
            params.append(("attribute", t, attr))
        return params

    def signature(
        self,
        inputs: Sequence[Any],
        output_dtypes: Sequence[Any],
        template: Sequence[tuple[str, Any]] = (),
    ) -> str:
        """The text MLX puts between the header and the body (template line, ``[[kernel]]``
        declaration, parameters with their ``[[buffer(i)]]`` and attribute annotations)."""
        infos = [arg_info(x) for x in inputs]
        kname = self.kernel_name(infos, output_dtypes, template)
        params = self.signature_params(infos, output_dtypes)
        out = ""
        if template:
            out += "template <" + ", ".join(f"{_template_kind(v)} {k}" for k, v in template) + ">\n"
        out += f"[[kernel]] void {kname}(\n"
        buffers = [p for p in params if p[0] != "attribute"]
        attributes = [p for p in params if p[0] == "attribute"]
        n_in, n_out = len(infos), len(self.output_names)
        for index, (kind, ctype, name) in enumerate(buffers):
            out += f"  {ctype} {name} [[buffer({index})]]"
            if kind != "output":
                out += ",\n"
            # MLX compares the running buffer index (which also counts shape/stride buffers)
            # with the number of inputs and outputs; reproduced as is, to compile what it does.
            elif index < n_in + n_out - 1 or attributes:
                out += ",\n"
            else:
                out += ") {\n"
        for i, (_, ctype, name) in enumerate(attributes):
            out += f"  {ctype} {name} [[{name}]]"
            out += ",\n" if i < len(attributes) - 1 else ") {\n"
        return out

    def instantiation(
        self,
        inputs: Sequence[Any],
        output_dtypes: Sequence[Any],
        template: Sequence[tuple[str, Any]] = (),
    ) -> str:
        """The explicit instantiation MLX appends for a templated kernel ("" otherwise)."""
        if not template:
            return ""
        kname = self.kernel_name(inputs, output_dtypes, template)
        tdef = kname + _write_template(template)
        return f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'

    def metal_source(
        self,
        inputs: Sequence[Any],
        output_dtypes: Sequence[Any],
        template: Sequence[tuple[str, Any]] = (),
    ) -> str:
        """The complete source MLX compiles for this call (without MLX's own utils prefix)."""
        template = self.check_template(template)
        return (
            self.header
            + self.signature(inputs, output_dtypes, template)
            + self.source
            + "\n}\n"
            + self.instantiation(inputs, output_dtypes, template)
        )

    def _check_counts(self, infos: Sequence[ArgInfo], output_dtypes: Sequence[Any]) -> None:
        if len(infos) != len(self.input_names):
            raise ValueError(
                f"kernel {self.name!r} takes {len(self.input_names)} inputs, got {len(infos)}"
            )
        if len(output_dtypes) != len(self.output_names):
            raise ValueError(
                f"kernel {self.name!r} has {len(self.output_names)} outputs, "
                f"got {len(output_dtypes)} dtypes"
            )

    # ---- running on an Apple GPU -------------------------------------------------------------

    def metal_kernel(self) -> Any:
        """The ``mx.fast.metal_kernel`` object for this spec (built once per spec)."""
        return _build_metal_kernel(self)

    def run_metal(self, call: KernelCall) -> list[mx.array]:
        """Launch on the Metal GPU through MLX (only where ``mx.metal.is_available()``)."""
        template = self.check_template(call.template)
        kwargs: dict[str, Any] = {}
        if template:
            kwargs["template"] = template
        if call.init_value is not None:
            kwargs["init_value"] = call.init_value
        return list(
            self.metal_kernel()(
                inputs=list(call.inputs),
                output_shapes=[tuple(s) for s in call.output_shapes],
                output_dtypes=list(call.output_dtypes),
                grid=tuple(call.grid),
                threadgroup=tuple(call.threadgroup),
                **kwargs,
            )
        )


def _metal_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else METAL_DIR / p


@functools.cache
def _build_metal_kernel(spec: KernelSpec) -> Any:
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=spec.ensure_row_contiguous,
        atomic_outputs=spec.atomic_outputs,
    )


def _write_template(template: Sequence[tuple[str, Any]]) -> str:
    return "<" + ", ".join(template_value(v) for _, v in template) + ">"


def _template_hash(template_def: str) -> str:
    # MLX: '<' and '>' become '_', ", " becomes '_', and the last character is dropped.
    out = []
    i = 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]
