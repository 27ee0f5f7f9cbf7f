"""``python -m mint_mlx.selftest`` on its Linux path: the kernels in the CPU emulator."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mint_mlx import selftest
from mint_mlx.tools.emulator import emulate

needs_cxx = pytest.mark.skipif(emulate.find_compiler() is None, reason="g++ not found")


@needs_cxx
def test_emulated_selftest_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert selftest.main(["--quick", "--emulate"]) == 0
    out = capsys.readouterr().out
    kernels = {"qmv ", "qmm ", "gather_qmv", "gather_qmm"}
    assert all(f"PASS  {k}" in out for k in kernels), out
    assert "FAIL" not in out
    assert "6/6 kernel checks passed" in out


def test_representative_set_covers_every_variant() -> None:
    cases = selftest.emulation_cases()
    assert {c.kernel for c in cases} == {"qmv", "qmm", "gather_qmv", "gather_qmm"}
    assert {c.fmt.bits for c in cases} == {2, 3, 4, 5, 6, 8}
    assert {(c.fmt.mode, c.fmt.group_size) for c in cases} >= {
        ("affine", g) for g in (16, 32, 64, 128, 256)
    } | {("affine_cs", g) for g in (16, 32, 64)}
    assert {c.dtype for c in cases} == {mx.float16, mx.bfloat16, mx.float32}


@needs_cxx
def test_a_failing_kernel_fails_the_selftest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = emulate.run_call

    def wrong(spec, call, **options):
        return [o + 1.0 for o in real(spec, call, **options)]

    monkeypatch.setattr(emulate, "run_call", wrong)
    assert selftest.main(["--quick", "--emulate"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_no_compiler_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(emulate, "find_compiler", lambda: None)
    assert selftest.main(["--emulate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "g++" in err[0]
