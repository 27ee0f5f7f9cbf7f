"""Run Metal kernels on a CPU: compile what ``mx.fast.metal_kernel`` would compile, with g++.

Why: our kernels must be right before anyone runs them on a Mac, and CI has no Apple GPU. The
emulator takes a :class:`~mint_mlx.runtime.kernels.spec.KernelSpec` and a launch, generates the source MLX
would generate (:meth:`KernelSpec.metal_source`), makes the few textual changes C++ needs, compiles
it against ``shim/mint_metal_shim.h`` (Metal's types and built-ins) and ``shim/mint_runtime.cpp``
(threadgroups one at a time, their threads as fibers, real barriers and simdgroup collectives) and
runs it through ctypes.

The changes to the text, all mechanical:

* ``[[...]]`` attributes are removed (the launcher passes buffers and attribute values itself);
* comments are blanked (line numbers kept), so the rewrites below never touch them;
* ``threadgroup T name[dims];`` declarations become references into a per-threadgroup arena
  (a C++ local would be private to each thread);
* half literals (``1.0h``) become ``half(1.0)``;
* ``#line`` directives map compiler messages and reports back to the ``.metal`` file.

With ``check=True`` (the default) the kernel is compiled with ``-fsanitize=thread`` so that every
load and store reaches the runtime's checks: out-of-bounds accesses to buffers and threadgroup
allocations, races on threadgroup memory (an access conflicting with another thread's since the
last barrier), unordered writes to the same output byte by two threads, reads of memory nothing
wrote, and outputs left unwritten. Detection does not depend on the order in which the fibers ran.
Errors raise an :class:`EmulationError` subclass whose message names the buffer, the threads and
the ``.metal`` lines involved.

Compiled kernels are cached by a hash of their full source, the shim, the runtime and the compiler
flags, under ``$MINT_MLX_KERNEL_CACHE`` or ``<mint cache>/kernels``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mint_mlx.errors import MintError
from mint_mlx.paths import cache_root
from mint_mlx.runtime.kernels.spec import (
    ArgInfo,
    KernelCall,
    KernelSpec,
    arg_info,
    template_value,
    type_string,
)

SHIM_DIR = Path(__file__).resolve().parent / "shim"

#: Threadgroup memory available to one threadgroup on Apple GPUs.
MAX_THREADGROUP_MEMORY = 32768

_SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2}

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "float": np.dtype(np.float32),
    "float16_t": np.dtype(np.float16),
    "bfloat16_t": np.dtype(np.uint16),  # raw bits; NumPy has no bfloat16
    "double": np.dtype(np.float64),
    "bool": np.dtype(np.bool_),
    "int8_t": np.dtype(np.int8),
    "int16_t": np.dtype(np.int16),
    "int32_t": np.dtype(np.int32),
    "int64_t": np.dtype(np.int64),
    "uint8_t": np.dtype(np.uint8),
    "uint16_t": np.dtype(np.uint16),
    "uint32_t": np.dtype(np.uint32),
    "uint64_t": np.dtype(np.uint64),
}

_CXX_FLAGS = [
    "-std=c++20",
    "-O1",
    "-g1",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-fno-threadsafe-statics",  # fibers share one OS thread; guards would need tsan atomics
    "-ffp-contract=off",
    "-U_FORTIFY_SOURCE",
    "-fdiagnostics-color=never",
    "-fmax-errors=20",
]
_CHECK_FLAGS = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]


# ------------------------------------------------------------------------------------------------
# Errors


class EmulationError(RuntimeError):
    """A kernel failed in the emulator; ``kind`` says how (see the subclasses)."""

    kind = "error"


class HarnessUnavailable(EmulationError, MintError):
    """No C++ compiler: install g++ (``apt-get install g++``) or point ``$MINT_MLX_CXX`` at one."""

    kind = "unavailable"


class KernelCompileError(EmulationError):
    """The generated source does not compile (message: the compiler's, mapped to the .metal)."""

    kind = "compile"


class KernelRaceError(EmulationError):
    """Conflicting accesses by two threads that no barrier orders."""

    kind = "race"


class KernelBoundsError(EmulationError):
    """An access outside a buffer or a threadgroup allocation (or a write to an input)."""

    kind = "out_of_bounds"


class KernelDivergenceError(EmulationError):
    """A barrier or simdgroup collective not reached uniformly, a deadlock, or a shuffle from an
    inactive lane: undefined behaviour or a hang on a GPU."""

    kind = "divergence"


class KernelFaultError(EmulationError):
    """The kernel crashed (segmentation fault far outside any buffer, division by zero, ...)."""

    kind = "fault"


class KernelUninitializedError(EmulationError):
    """A read of threadgroup or output memory that nothing wrote."""

    kind = "uninitialized"


class KernelUnwrittenError(EmulationError):
    """Output bytes the kernel never wrote (MLX leaves outputs uninitialized)."""

    kind = "unwritten"


class KernelLaunchError(EmulationError):
    """The launch itself is invalid (threadgroup too large, too much threadgroup memory)."""

    kind = "invalid_launch"


_ERROR_CLASSES: dict[int, type[EmulationError]] = {
    1: KernelRaceError,
    2: KernelBoundsError,
    3: KernelDivergenceError,
    4: KernelFaultError,
    5: KernelUninitializedError,
    6: KernelUnwrittenError,
    7: KernelLaunchError,
}


# ------------------------------------------------------------------------------------------------
# ctypes mirror of shim/mint_runtime.h


class _BufferDesc(ctypes.Structure):
    _fields_ = [
        ("host", ctypes.c_void_p),
        ("nbytes", ctypes.c_uint64),
        ("name", ctypes.c_char_p),
        ("role", ctypes.c_int32),
        ("initialized", ctypes.c_int32),
    ]


class _LaunchDesc(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("nbuffers", ctypes.c_int32),
        ("check", ctypes.c_int32),
        ("check_uninitialized", ctypes.c_int32),
        ("require_full_write", ctypes.c_int32),
        ("schedule", ctypes.c_int32),
        ("max_threadgroup_memory", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("buffers", ctypes.POINTER(_BufferDesc)),
        ("message", ctypes.c_void_p),
        ("message_cap", ctypes.c_uint64),
        ("error_kind", ctypes.c_int32),
        ("n_errors", ctypes.c_int32),
        ("pcs", ctypes.c_uint64 * 8),
        ("n_pcs", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("stats", ctypes.c_uint64 * 4),
    ]


_ABI = ctypes.sizeof(_LaunchDesc) * 1000 + ctypes.sizeof(_BufferDesc)


# ------------------------------------------------------------------------------------------------
# Source transformation


def _blank_comments(text: str) -> str:
    """Replace comments by spaces, keeping newlines (and so line numbers). Strings are kept."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


_ATTRIBUTE = re.compile(r"\[\[[^\[\]]*\]\]")
_HALF_LITERAL = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[hH]\b")
_TG_DECL = re.compile(
    r"\bthreadgroup\s+"
    r"(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*"
    r"(?P<dims>(?:\[[^\[\];]+\]\s*)*);"
)
_TG_WORD = re.compile(r"\bthreadgroup\b")


class _SlotCounter:
    def __init__(self) -> None:
        self.n = 0

    def rewrite(self, text: str, where: str) -> str:
        def repl(m: re.Match[str]) -> str:
            slot = self.n
            self.n += 1
            dims = re.sub(r"\s+", "", m.group("dims"))
            t = m.group("type").strip()
            name = m.group("name")
            return f'auto& {name} = ::mint::tg_alloc<{t}{dims}>({slot}, "{name}");'

        text = _TG_DECL.sub(repl, text)
        for m in _TG_WORD.finditer(text):
            rest = re.split(r"[;,){=]", text[m.end() :], maxsplit=1)[0]
            if "*" not in rest and "&" not in rest:
                line = text.count("\n", 0, m.start()) + 1
                raise KernelCompileError(
                    f"{where}, line {line}: cannot emulate this threadgroup declaration "
                    f"('threadgroup{rest.strip()[:60]} ...'); declare one variable per statement, "
                    f"as 'threadgroup T name[N];'"
                )
        return text


def _prepare(text: str, slots: _SlotCounter, where: str) -> str:
    text = _blank_comments(text)
    text = _ATTRIBUTE.sub("", text)
    text = _HALF_LITERAL.sub(r"half(\1)", text)
    return slots.rewrite(text, where)


def _line(n: int, origin: str) -> str:
    return f'#line {n} "{origin}"\n'


def harness_source(
    spec: KernelSpec,
    inputs: Sequence[Any],
    output_dtypes: Sequence[Any],
    template: Sequence[tuple[str, Any]] = (),
) -> str:
    """The C++ translation unit the emulator compiles for this call.

    It is :meth:`KernelSpec.metal_source` piece by piece (header, signature, body, instantiation)
    after the mechanical rewrites listed in the module docstring, followed by a launcher that
    passes the buffers and attribute values in the signature's order.
    """
    infos = [arg_info(x) for x in inputs]
    template = spec.check_template(template)
    origin = spec.origin or f"<{spec.name}>"
    kname = spec.kernel_name(infos, output_dtypes, template)
    slots = _SlotCounter()
    parts = [
        '#include "mint_metal_shim.h"\n',
        _line(spec.header_line, origin),
        _prepare(spec.header, slots, f"{origin} (header)"),
        "\n" + _line(1, f"<signature generated for {kname}>"),
        _ATTRIBUTE.sub("", spec.signature(infos, output_dtypes, template)),
        _line(spec.body_line, origin),
        _prepare(spec.source, slots, f"{origin} (body)"),
        "\n}\n",
        _ATTRIBUTE.sub("", spec.instantiation(infos, output_dtypes, template)),
        "\n" + _line(1, "<emulator launcher>"),
        _launcher(spec, infos, output_dtypes, template, kname),
    ]
    return "".join(parts)


def _launcher(
    spec: KernelSpec,
    infos: Sequence[ArgInfo],
    output_dtypes: Sequence[Any],
    template: Sequence[tuple[str, Any]],
    kname: str,
) -> str:
    args: list[str] = []
    k = 0
    for kind, ctype, name in spec.signature_params(infos, output_dtypes):
        base = re.sub(r"\b(const|constant|device)\b", "", ctype).strip()
        if kind == "attribute":
            args.append(f"::mint::u3(t.{name})" if ctype == "uint3" else f"t.{name}")
            continue
        if kind in ("scalar", "ndim"):
            args.append(f"*(const {base.rstrip('&').strip()}*)b[{k}]")
        elif kind == "output":
            args.append(f"({base})b[{k}]")
        else:
            args.append(f"(const {base})b[{k}]")
        k += 1
    targs = ""
    if template:
        targs = "<" + ", ".join(template_value(v) for _, v in template) + ">"
    call = f"{kname}{targs}(\n      " + ",\n      ".join(args) + ")"
    return (
        "__attribute__((no_sanitize_thread)) static void mint_entry(void** b) {\n"
        "  const ::mint_rt::ThreadInfo& t = *::mint_rt::thread_info();\n"
        "  (void)t;\n"
        f"  {call};\n"
        "}\n"
        'extern "C" __attribute__((visibility("default"))) int '
        "mint_launch(::mint_rt::LaunchDesc* d) {\n"
        "  return ::mint_rt::launch(d, &mint_entry);\n"
        "}\n"
        'extern "C" __attribute__((visibility("default"))) unsigned long mint_abi() {\n'
        "  return sizeof(::mint_rt::LaunchDesc) * 1000 + sizeof(::mint_rt::BufferDesc);\n"
        "}\n"
    )


# ------------------------------------------------------------------------------------------------
# Compilation


def find_compiler() -> str | None:
    """The C++ compiler: ``$MINT_MLX_CXX``, else ``g++`` on the PATH (None if there is none)."""
    cxx = os.environ.get("MINT_MLX_CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if Path(cxx).exists() else None)
    return shutil.which("g++")


def kernel_cache_dir() -> Path:
    """``$MINT_MLX_KERNEL_CACHE`` or ``<mint cache>/kernels``: compiled kernels, by hash."""
    env = os.environ.get("MINT_MLX_KERNEL_CACHE")
    path = Path(env).expanduser() if env else cache_root() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


_lock = threading.Lock()
_compiler_ids: dict[str, str] = {}
_loaded: dict[Path, ctypes.CDLL] = {}


def _compiler_id(cxx: str) -> str:
    if cxx not in _compiler_ids:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
        _compiler_ids[cxx] = cxx + "\n" + out.stdout.splitlines()[0] if out.stdout else cxx
    return _compiler_ids[cxx]


def _shim_text() -> str:
    names = ["mint_metal_shim.h", "mint_runtime.h", "mint_runtime.cpp"]
    return "".join((SHIM_DIR / n).read_text() for n in names)


def _run_compiler(cmd: list[str], what: str, source_path: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).splitlines()
        shown = "\n".join(lines[:60]) + ("\n..." if len(lines) > 60 else "")
        where = f"\n(generated source kept at {source_path})" if source_path else ""
        raise KernelCompileError(f"{what} failed to compile:\n{shown}{where}")


def _runtime_object(cxx: str, cache: Path) -> Path:
    key = hashlib.sha256(
        (_compiler_id(cxx) + " ".join(_CXX_FLAGS) + _shim_text()).encode()
    ).hexdigest()[:16]
    obj = cache / f"mint_runtime-{key}.o"
    if not obj.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / "rt.o"
            _run_compiler(
                [
                    cxx,
                    *_CXX_FLAGS,
                    "-I",
                    str(SHIM_DIR),
                    "-c",
                    str(SHIM_DIR / "mint_runtime.cpp"),
                    "-o",
                    str(out),
                ],
                "the emulator runtime",
            )
            os.replace(out, obj)
    return obj


def compile_kernel(source: str, *, check: bool = True) -> Path:
    """Compile a harness translation unit to a shared object (cached by content hash)."""
    cxx = find_compiler()
    if cxx is None:
        raise HarnessUnavailable(
            "no C++ compiler found: install g++ (apt-get install g++) or set MINT_MLX_CXX"
        )
    cache = kernel_cache_dir()
    flags = _CXX_FLAGS + (_CHECK_FLAGS if check else [])
    key = hashlib.sha256(
        "\0".join([_compiler_id(cxx), " ".join(flags), _shim_text(), source]).encode()
    ).hexdigest()[:24]
    so = cache / f"kernel-{key}.so"
    if so.exists():
        return so
    with _lock:
        if so.exists():
            return so
        runtime = _runtime_object(cxx, cache)
        src = cache / f"kernel-{key}.cpp"
        src.write_text(source)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            obj = Path(tmp) / "k.o"
            out = Path(tmp) / "k.so"
            _run_compiler(
                [
                    cxx,
                    *flags,
                    "-w",
                    "-I",
                    str(SHIM_DIR),
                    "-I",
                    str(SHIM_DIR / "include"),
                    "-c",
                    str(src),
                    "-o",
                    str(obj),
                ],
                "kernel",
                src,
            )
            _run_compiler(
                [
                    cxx,
                    "-shared",
                    "-o",
                    str(out),
                    str(obj),
                    str(runtime),
                    "-Wl,-z,defs",
                    "-lm",
                    "-ldl",
                    "-lpthread",
                ],
                "kernel (link)",
                src,
            )
            os.replace(out, so)
    return so


def _load(so: Path) -> ctypes.CDLL:
    lib = _loaded.get(so)
    if lib is None:
        lib = ctypes.CDLL(str(so))
        lib.mint_launch.argtypes = [ctypes.POINTER(_LaunchDesc)]
        lib.mint_launch.restype = ctypes.c_int
        lib.mint_abi.restype = ctypes.c_ulong
        if lib.mint_abi() != _ABI:
            raise EmulationError(f"{so}: launcher ABI mismatch with emulate.py (stale cache?)")
        _loaded[so] = lib
    return lib


# ------------------------------------------------------------------------------------------------
# Running


@dataclass
class EmulationResult:
    """Outputs of an emulated launch, the error (if any) and counters.

    ``stats``: threadgroups run, barriers completed, collectives completed, accesses checked.
    """

    outputs: list[np.ndarray]
    error: EmulationError | None
    stats: dict[str, int]


def _host_input(x: Any) -> tuple[ArgInfo, np.ndarray]:
    info = arg_info(x)
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            data = np.array(x.view(mx.uint16))
        else:
            data = np.array(x)
    elif isinstance(x, np.ndarray):
        data = x
    else:
        data = np.array(x, dtype=_STORAGE_DTYPES[info.dtype])
    if info.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"the emulator does not support inputs of type {info.dtype}")
    data = np.ascontiguousarray(data).view(_STORAGE_DTYPES[info.dtype])
    return info, data


def _to_float32_if_bf16(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype != "bfloat16_t":
        return data
    return (data.astype(np.uint32) << 16).view(np.float32)


def _symbolize(so: Path, message: str) -> str:
    """Replace ``@pc:0x...`` tokens by source locations (via addr2line, when available)."""
    tokens = sorted(set(re.findall(r"@pc:(0x[0-9a-f]+)", message)))
    tool = shutil.which("addr2line")
    if not tokens:
        return message
    where: dict[str, str] = {}
    if tool:
        for tok in tokens:
            proc = subprocess.run(
                [tool, "-i", "-e", str(so), tok], capture_output=True, text=True, check=False
            )
            frames = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
            # Innermost first: prefer the first frame outside the shim (the kernel's own line).
            chosen = next((f for f in frames if "mint_metal_shim.h" not in f), None)
            if chosen is None and frames:
                chosen = frames[0]
            if chosen and not chosen.startswith("??"):
                chosen = re.sub(r" \(discriminator \d+\)", "", chosen)
                where[tok] = re.sub(r"^.*/(<[^>]*>)", r"\1", chosen)
    return re.sub(
        r"@pc:(0x[0-9a-f]+)", lambda m: where.get(m.group(1), f"code offset {m.group(1)}"), message
    )


def emulate(
    spec: KernelSpec,
    inputs: Sequence[Any],
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence[Any],
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Sequence[tuple[str, Any]] = (),
    *,
    init_value: float | None = None,
    check: bool = True,
    check_uninitialized: bool = True,
    require_full_write: bool | None = None,
    schedule: str = "forward",
    seed: int = 0,
    max_threadgroup_memory: int = MAX_THREADGROUP_MEMORY,
) -> EmulationResult:
    """Run one launch in the emulator and return outputs, error and counters (never raises for
    kernel errors; see :func:`run_emulated`).

    ``schedule`` orders the fibers between synchronization points: ``forward``, ``reverse`` or a
    seeded ``shuffle``. Results of a correct kernel do not depend on it. ``require_full_write``
    (default: when there is no ``init_value``) reports outputs the kernel leaves unwritten.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(_SCHEDULES)}")
    if len(grid) != 3 or len(threadgroup) != 3:
        raise ValueError("grid and threadgroup are 3-tuples")
    if any(int(g) < 0 for g in grid) or any(int(t) < 1 for t in threadgroup):
        raise ValueError(f"invalid grid {tuple(grid)} or threadgroup {tuple(threadgroup)}")
    hosts = [_host_input(x) for x in inputs]
    infos = [h[0] for h in hosts]
    out_types = [type_string(d) for d in output_dtypes]
    if len(output_shapes) != len(out_types):
        raise ValueError("output_shapes and output_dtypes differ in length")
    source = harness_source(spec, infos, out_types, template)
    so = compile_kernel(source, check=check)
    lib = _load(so)

    keep: list[Any] = []
    buffers: list[tuple[np.ndarray, str, int, int]] = []  # array, name, role, initialized
    params = spec.signature_params(infos, out_types)
    in_iter = iter(zip(spec.input_names, hosts, strict=True))
    current: tuple[ArgInfo, np.ndarray] | None = None
    for kind, _ctype, name in params:
        if kind in ("input", "scalar"):
            _, current = next(in_iter)
            assert current is not None
            buffers.append((current[1], name, 0, 0))
        elif kind in ("shape", "strides", "ndim"):
            assert current is not None
            cinfo = current[0]
            if kind == "shape":
                arr = np.array(cinfo.shape, dtype=np.int32)
            elif kind == "strides":
                strides = [
                    int(np.prod(cinfo.shape[i + 1 :], dtype=np.int64)) for i in range(cinfo.ndim)
                ]
                arr = np.array(strides, dtype=np.int64)
            else:
                arr = np.array([cinfo.ndim], dtype=np.int32)
            buffers.append((arr, name, 0, 0))
    outputs: list[np.ndarray] = []
    for name, shape, t in zip(spec.output_names, output_shapes, out_types, strict=True):
        storage = _STORAGE_DTYPES.get(t)
        if storage is None:
            raise TypeError(f"the emulator does not support outputs of type {t}")
        out = np.empty(tuple(int(s) for s in shape), dtype=storage)
        if init_value is not None:
            if t == "bfloat16_t":
                out[...] = np.array(mx.full(out.shape, init_value, mx.bfloat16).view(mx.uint16))
            else:
                out[...] = init_value
        outputs.append(out)
        buffers.append((out, name, 1, int(init_value is not None)))

    descs = (_BufferDesc * max(len(buffers), 1))()
    for i, (arr, name, role, initialized) in enumerate(buffers):
        bname = name.encode()
        keep.append(bname)
        descs[i].host = arr.ctypes.data if arr.nbytes else None
        descs[i].nbytes = arr.nbytes
        descs[i].name = bname
        descs[i].role = role
        descs[i].initialized = initialized
    message = ctypes.create_string_buffer(16384)
    d = _LaunchDesc()
    for i in range(3):
        d.grid[i] = int(grid[i])
        d.threadgroup[i] = int(threadgroup[i])
    d.nbuffers = len(buffers)
    d.check = int(check)
    d.check_uninitialized = int(check_uninitialized)
    full = init_value is None if require_full_write is None else require_full_write
    d.require_full_write = int(full)
    d.schedule = _SCHEDULES[schedule]
    d.max_threadgroup_memory = int(max_threadgroup_memory)
    d.seed = int(seed) & (2**64 - 1)
    d.buffers = descs
    d.message = ctypes.addressof(message)
    d.message_cap = len(message)
    kind = lib.mint_launch(ctypes.byref(d))

    error: EmulationError | None = None
    if kind:
        text = message.value.decode(errors="replace")
        cls = _ERROR_CLASSES.get(kind, EmulationError)
        error = cls(f"kernel {spec.name!r}: " + _symbolize(so, text))
    results = [_to_float32_if_bf16(o, t) for o, t in zip(outputs, out_types, strict=True)]
    stats = dict(
        zip(("threadgroups", "barriers", "collectives", "checked_accesses"), d.stats, strict=True)
    )
    return EmulationResult(results, error, {k: int(v) for k, v in stats.items()})


def run_emulated(
    spec: KernelSpec,
    inputs: Sequence[Any],
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence[Any],
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Sequence[tuple[str, Any]] = (),
    **options: Any,
) -> list[np.ndarray]:
    """Run a kernel launch in the emulator, as ``mx.fast.metal_kernel`` would on a GPU.

    Inputs are NumPy arrays, MLX arrays (needed for bfloat16) or Python scalars; outputs come back
    as NumPy arrays (bfloat16 outputs as float32, exactly). Raises an :class:`EmulationError`
    subclass when the kernel misbehaves; ``options`` are those of :func:`emulate`.
    """
    result = emulate(
        spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template, **options
    )
    if result.error is not None:
        raise result.error
    return result.outputs


def emulate_call(spec: KernelSpec, call: KernelCall, **options: Any) -> EmulationResult:
    """:func:`emulate` for a :class:`KernelCall` (the launch a kernel's Python side builds):
    the result with its error and statistics, for tests that inspect them."""
    return emulate(
        spec,
        call.inputs,
        call.output_shapes,
        call.output_dtypes,
        call.grid,
        call.threadgroup,
        call.template,
        init_value=call.init_value,
        **options,
    )


def run_call(spec: KernelSpec, call: KernelCall, **options: Any) -> list[np.ndarray]:
    """:func:`run_emulated` for a :class:`KernelCall`: the outputs, or the kernel's error."""
    result = emulate_call(spec, call, **options)
    if result.error is not None:
        raise result.error
    return result.outputs
