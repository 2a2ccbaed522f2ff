"""The benchmark script and the GPU compile path, proven without a GPU.

The benchmark's CPU smoke mode runs every torch variant, the gate and the table end to end; the
Triton-specific parts of the benchmark (gate, per-kernel rates) run here at a tiny size (in the
interpreter without a GPU). compile_check compiles every kernel for sm_90 with Triton's own ptxas:
the interpreter never meets the GPU compiler, so this is what catches kernels that would only fail
on a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

from sae.core.kernels import bench


def test_bench_smoke_runs_end_to_end(capsys, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", "torch")
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "gate (ours vs fp32 reference): PASS" in out and "binding gate: PASS" in out
    table = out[out.index("step ms"):]
    assert "naive" in table and "ours" in table and "binding" in table
    assert table.count("| ok") == 1


def test_bench_gate_and_kernel_rates_through_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SAE_KERNELS", "triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = bench.Setup(16, 16, 64, 3, device)
    ok, errs, bad = bench.gate(s, device)
    assert ok, bad
    rates = bench.sparse_kernel_rates(s, device, rep_ms=1)
    assert set(rates) == {"dec_fwd", "dec_bwd", "enc_bwd", "sort_ms"}
    b = bench.Setup(16, 16, 64, 3, device, binding_slots=2)
    ok, errs, bad = bench.gate(b, device, binding=True)
    assert ok, bad


def test_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("this triton build ships no NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "sae.core.kernels.compile_check", "--quick"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout and "SPILLS" not in r.stdout, r.stdout
    assert r.stdout.count("regs") >= 4, r.stdout
