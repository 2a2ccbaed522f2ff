"""The peer benchmark: its smoke mode (what CI runs) passes its gates without the bench extra, a
wrong step fails a gate, and the targets are read off the table as the issue states them."""
import os
import subprocess
import sys

import pytest
import torch

from sae.core.kernels import reference
from sae.eval import peer_bench, peers


def test_the_smoke_run_passes_its_gates_and_says_which_peers_it_skipped():
    run = subprocess.run([sys.executable, "-m", "sae.eval.peer_bench", "--smoke"], capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    gates = [line for line in run.stdout.splitlines() if line.startswith("gate ")]
    assert len(gates) == 2 * 2 * 3 and all(": PASS" in line for line in gates)  # 2 widths x AuxK off/on x 3 gates
    assert "| ours ms |" in run.stdout.replace("| d | n | AuxK ", "")
    for name, version in peers.available().items():
        assert (f"{name}: not installed" in run.stdout) == (version is None)


def test_a_wrong_gradient_fails_the_gates(monkeypatch, capsys):
    real = reference.gather_dot
    monkeypatch.setattr(reference, "gather_dot", lambda G, R, idx: 0.5 * real(G, R, idx))  # d values halved
    assert peer_bench.main(["--smoke", "--d", "16", "--aux", "off", "--only", "naive"]) == 1
    out = capsys.readouterr().out
    assert "gradients: FAIL" in out


def test_ours_and_naive_start_from_the_same_weights_and_agree():
    batches = peer_bench.make_batches(16, 64, 4)
    ours = peer_bench.OursStep(16, 128, 2, torch.device("cpu"), seed=0, lr=1e-3)
    naive = peer_bench.NaiveStep(ours, 1e-3)
    for impl in (ours, naive):
        impl.setup(batches[0])
    for x in batches[:3]:
        for impl in (ours, naive):
            impl.set_dead(None)
            impl.step(x)
    torch.testing.assert_close(ours.model.W_dec.detach(), naive.params["W_dec"].detach(), rtol=1e-4, atol=1e-5)


def _row(d, aux, **ms):
    return {"d": d, "aux": aux, "impls": {name: {"ms": v} for name, v in ms.items()}}


@pytest.mark.parametrize("d,sparsify_ms,want", [(64, 10.0, True), (64, 9.9, False), (256, 13.0, True), (768, 12.9, False)])
def test_targets_follow_the_issue(d, sparsify_ms, want):
    rows = [_row(d, True, ours=10.0, saelens=30.0, sparsify=sparsify_ms, **{"sparsify-adam": 50.0})]
    found = peer_bench.targets(rows, torch.device("cpu"))
    assert [ok for what, ok, _ in found if "sparsify" in what] == [want]
    assert [ok for what, ok, _ in found if "SAELens" in what] == [True]
