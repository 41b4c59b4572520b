"""faiss-cpu's bundled OpenBLAS gets its kernel family from the CPU flags (4x k-means speed on the H200 machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddm_trainer.clustering import cpu_flags, openblas_coretype

AVX512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl"}


@pytest.mark.parametrize(("flags", "expected"), [
    (AVX512 | {"avx2", "fma"}, "SkylakeX"),
    ({"avx2", "fma", "avx512f"}, "Haswell"),  # AVX-512 foundation alone is not what SkylakeX kernels use
    ({"avx2", "fma"}, "Haswell"),
    ({"avx", "sse4_2"}, None),  # too old for either family: OpenBLAS decides
    (set(), None),  # no /proc/cpuinfo (macOS, Windows)
])
def test_coretype_from_flags(flags, expected):
    assert openblas_coretype(frozenset(flags)) == expected


def test_cpu_flags_parses_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 fma\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_flags(str(cpuinfo)) == frozenset({"fpu", "sse2", "avx2", "fma"})
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def _import_in_fresh_interpreter(tmp_path: Path, flags: str, preset: str | None) -> tuple[str, str]:
    """Run import_faiss() in a new process (OpenBLAS reads the variable once, at load) -> (variable, verbose log)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["OPENBLAS_VERBOSE"] = "2"  # OpenBLAS prints "Core: <family>" for each library it loads
    if preset:
        env["OPENBLAS_CORETYPE"] = preset
    code = ("import os, numpy as np\n"
            "from ddm_trainer.clustering import import_faiss\n"
            f"faiss = import_faiss(cpuinfo={str(cpuinfo)!r})\n"
            "faiss.Kmeans(8, 2, niter=1, seed=0).train(np.random.default_rng(0).random((200, 8), dtype=np.float32))\n"
            "print(os.environ.get('OPENBLAS_CORETYPE'))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return out.stdout.strip().splitlines()[-1], out.stdout + out.stderr


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="forcing Haswell kernels needs an AVX2 CPU")
def test_import_faiss_forces_kernels_from_flags(tmp_path):
    variable, log = _import_in_fresh_interpreter(tmp_path, "fpu sse2 avx avx2 fma", preset=None)
    assert variable == "Haswell"
    assert "Core: Haswell" in log  # faiss's OpenBLAS ran the kernels it was told to


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="forcing Haswell kernels needs an AVX2 CPU")
def test_import_faiss_keeps_a_users_choice(tmp_path):
    variable, _ = _import_in_fresh_interpreter(tmp_path, " ".join(sorted(AVX512 | {"avx2", "fma"})), preset="Haswell")
    assert variable == "Haswell"
