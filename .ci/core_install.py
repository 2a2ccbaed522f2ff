"""Run in a venv holding only the core dependencies (no extras): every default path of the library
must work there. Trains a TopK SAE and a binding SAE (default recipe: bind, split, match, rebind),
saves and loads both. Usage: python .ci/core_install.py WORK_DIR"""
import sys
from pathlib import Path

import torch

import sae

work = Path(sys.argv[1])
torch.manual_seed(0)
atoms = torch.nn.functional.normalize(torch.randn(48, 16), dim=1)
x = ((torch.rand(4096, 48) < 3 / 48) * (1 + torch.rand(4096, 48))) @ atoms

for name, model in [("topk", sae.TopKSAE(16, 64, k=3)), ("binding", sae.BindingSAE(16, 32, n_slots=2, k=3))]:
    result = sae.train(model, x, steps=200, batch_size=256, lr=3e-3, run_dir=str(work / name))
    assert result.metrics["fvu"] < 1, result.metrics
    if name == "binding":
        assert "rebind_pairs" in result.metrics, "the default binding recipe did not run"
    model.save(work / f"{name}-saved")
    loaded = sae.load(work / f"{name}-saved")
    assert torch.allclose(loaded.encode(x[:64]), model.encode(x[:64]), atol=1e-6)
    print(f"core install: {name} trained (FVU {result.metrics['fvu']:.3f}), saved and loaded")
