"""Started by tests/test_distributed.py, under torchrun or alone: trains the tiny set below in one
mode and writes each dictionary's final weights (one file per rank), so the test can compare
modes with one process. Not a test module itself (no test_ prefix)."""
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_trainer import sparse_data

import sae
from sae.core import distributed

OPTIONS = dict(steps=24, batch_size=64, lr=3e-3, seed=0, log_every=4, eval_tokens=256, threads=1)


def models(kind: str) -> dict:
    torch.manual_seed(0)
    # dead_tokens small enough that latents die within the run: AuxK and the dead counts take part.
    made = {"topk": sae.TopKSAE(16, 64, k=4, dead_tokens=64), "bt": sae.BatchTopKSAE(16, 64, k=4, dead_tokens=64),
            "bind": sae.BindingSAE(16, 32, n_slots=2, k=4, dead_tokens=64)}
    if kind == "one":
        return {"": made["topk"]}  # one dictionary: the flat run layout
    if kind == "all":
        made["jr"] = sae.JumpReLUSAE(16, 64)
        made["relu"] = sae.ReLUSAE(16, 32)
    return made


def main(mode: str, kind: str, out: str, run_dir: str = "", *extra: str):
    torch.set_num_threads(1)
    Path(out).mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:  # so that a test can kill one rank
        (Path(out) / f"pid.rank{os.environ['RANK']}").write_text(str(os.getpid()))
    options = {k: v for k, v in OPTIONS.items() if k != "threads"}
    options["binding_recipe"] = "plain"  # the binding SAE trains in step with the others
    options.update((a.split("=")[0], json.loads(a.split("=")[1])) for a in extra)  # "steps=40": the test's
    die_at = options.pop("die_at", 0)  # rank 1 kills itself after this step (a rank dying, at a known step)
    set_ = models(kind)
    if kind == "all":
        options["target_l0"] = 6.0  # steers jr and relu (TopK refuses it, so a set of its own)
        set_ = {k: v for k, v in set_.items() if k in ("jr", "relu")}
    data = sparse_data(n=2048)
    if run_dir:
        options["run_dir"] = run_dir
    aux = {}  # AuxK's loss at log steps: the test checks that it took part

    def seen(step, logs):
        if step == die_at and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        for name, line in (logs.items() if "step" not in logs else []):
            aux[name] = max(aux.get(name, 0.0), line.get("aux", 0.0))

    options["callback"] = seen
    rank = int(os.environ.get("RANK", "0"))
    shards = {}  # latents mode: what each rank holds, for the test's memory check
    if mode == "latents":
        cut = distributed.sharded.shard
        distributed.sharded.shard = lambda full, group: shards.setdefault(id(full), cut(full, group))
    if mode == "single" and list(set_) == [""]:
        results = {"": sae.train(set_[""], data, **options)}
    elif mode == "single":
        results = sae.train_many(set_, data, **options)
    else:
        results = distributed.train(set_, data, parallel=mode, **options)
    held = {id(m): sum(p.numel() for p in s.parameters()) for m, s in ((m, shards.get(id(m))) for m in set_.values()) if s}
    for name, result in results.items():
        state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(Path(out) / f"{name or 'dict'}.rank{rank}.safetensors"),
                  metadata={"aux": str(aux.get(name, 0.0)), "held": str(held.get(id(set_[name]), 0)),
                            **{k: str(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}})


if __name__ == "__main__":
    main(*sys.argv[1:])
