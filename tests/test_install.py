"""The project installs and imports as a newcomer meets it: nothing in the repo shadows an installed
distribution, whatever the working directory puts on sys.path."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run from the repo root, as `python train.py`, `python -m pytest` or a notebook started there do (the
# root, and pytest's rootdir-relative tests/ folder, are then on sys.path).
PROBE = r"""
import importlib.metadata as md, importlib.util, json, pathlib, sys
root = pathlib.Path.cwd().resolve()
sys.path.insert(1, str(root / "tests"))
import transformers.models.bert.modeling_bert  # transformers 5.2x imports HF's `kernels` here
import kernels as hf_kernels
import sae, sae.core.kernels, sae.eval
names = {}
for name, dists in md.packages_distributions().items():
    names.setdefault(name, set()).update(dists)
local = {p.stem if p.suffix == ".py" else p.name for d in (root, root / "tests") for p in d.iterdir()
         if not p.name.startswith((".", "_")) and (p.is_dir() or p.suffix == ".py")}
shadowed = []
for name in sorted(local & set(names)):
    if names[name] == {"sae"}:
        continue  # our own distribution
    spec = importlib.util.find_spec(name)
    where = spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations))
    if pathlib.Path(where).resolve().is_relative_to(root):
        shadowed.append([name, where])
print(json.dumps({"shadowed": shadowed, "hf_kernels_installed": "kernels" in names,
                  "hf_kernels": hf_kernels.__file__, "sae": sae.__file__}))
"""


def test_nothing_in_the_repo_shadows_an_installed_distribution():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shadowed"] == []
    assert report["hf_kernels_installed"], "the Hugging Face kernels distribution must be installed for this check"
    assert not Path(report["hf_kernels"]).resolve().is_relative_to(REPO)
    assert Path(report["sae"]).resolve().is_relative_to(REPO / "sae")
