"""The compatibility fixtures that tests/test_legacy.py reads, and the code that computes them.

    python tests/data/legacy_dictionaries/make_fixtures.py [OUT_DIR]     # default: this folder

The checked-in files were written by the code of commit d32c068, where a structured SAE's sparsity
rule was chosen by combined subclasses (ComposedSAE.__new__ -> BindingTopKSAE, ...), before sparsity
became a component. For every architecture x sparsity rule (CASES) this folder holds:
    <case>/                      a dictionary saved by sae.save (cfg.json, sae_weights.safetensors, ...)
    <case>.outputs.safetensors   inputs x and that dictionary's eval-mode codes and x_hat
    <case>.init.safetensors      the state_dict of the case's constructor right after torch.manual_seed(0)
    <case>.step.safetensors      one training forward/backward from a seeded start: loss parts, x_hat,
                                 codes, gradients, buffers after the step (threshold EMA, firing
                                 counters), the decoder gradient after remove_parallel_grad_, and the
                                 parameters after steer_l0_
    <case>.split.safetensors     (binding) the state_dict of the binding recipe's split-phase SAE
    cases.json                   per case: constructor, state_dict and parameter order, config_dict(),
                                 saelens_fields(), loss names, and the split SAE's architecture and config
The tests recompute each with today's code (the functions below) and compare. Rerunning this
script overwrites the fixtures with what today's code computes: do that only on purpose.
"""
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

import sae
import sae.recipes.binding

HERE = Path(__file__).resolve().parent
D_IN, N = 8, 16
# name -> (architecture, options as cfg.json and train.py pass them); tiny: a few KB per file
CASES = {
    "topk": ("topk", dict(k=3)),
    "topk_kaiming": ("topk", dict(k=3, aux_k=2, init_encoder_from_decoder=False, decoder_init_norm=0.5)),
    "batchtopk": ("batchtopk", dict(k=3, threshold_lr=0.5)),
    "relu": ("relu", dict()),
    "jumprelu": ("jumprelu", dict(init_threshold=0.2, bandwidth=0.1)),
    "binding_topk": ("binding", dict(k=3, transform_init="random_orthogonal")),
    "binding_topk_per_slot": ("binding", dict(sparsity="topk_per_slot", n_slots=3, k=2,
                                              transform_init="random_orthogonal")),
    "binding_batchtopk": ("binding", dict(sparsity="batchtopk", k=3, transform_init="random_orthogonal")),
    "binding_relu": ("binding", dict(sparsity="relu", transform_init="random_orthogonal")),
    "binding_jumprelu": ("binding", dict(sparsity="jumprelu", l0_coeff=0.2, transform_init="random_orthogonal")),
    "binding_topk_full": ("binding", dict(k=3, slot_transform="full", transform_init="near_identity")),
    "binding_topk_identity": ("binding", dict(k=3, slot_transform="identity")),
    "binding_topk_groups": ("binding", dict(k=3, slot_group_sizes=[4, 12], transform_init="random_orthogonal")),
    "matryoshka_topk": ("matryoshka", dict(sparsity="topk", k=3, group_sizes=[4, 12])),
    "matryoshka_batchtopk": ("matryoshka", dict(k=3)),
}
DEAD_TOKENS = 4  # the training step marks every third latent dead, so AuxK runs where the rule has it


def build(case, **extra):
    arch, options = CASES[case]
    return sae.SAE.registry[arch](D_IN, N, **options, **extra)


@torch.no_grad()
def trained_looking(model, seed):
    """Move every weight as training would, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    if "threshold" in dict(model.named_buffers()):
        model.threshold.fill_(0.3)
    model.normalize_decoder_()


def index(case):
    return list(CASES).index(case)


def saved_model(case):
    """The model saved as <case>/, and the inputs its outputs are computed on."""
    torch.manual_seed(100 + index(case))
    model = build(case)
    trained_looking(model, 200 + index(case))
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(300 + index(case))) * 2
    return model.eval(), x


def initial_model(case):
    torch.manual_seed(0)
    return build(case)


def training_step(case):
    """(tensors, info) of one training step from a seeded start."""
    torch.manual_seed(0)
    model = build(case, dead_tokens=DEAD_TOKENS).train()
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_(0, 0.3)
        model.tokens_since_fired[::3] = 10
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(400 + index(case))) * 2
    out = model(x)
    out.loss.backward()
    step = {f"loss.{k}": v.detach().reshape(()) for k, v in out.losses.items()}
    step.update({"x": x, "x_hat": out.x_hat.detach(), "codes": out.codes.detach()})
    step.update({f"grad.{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    step.update({f"buffer.{k}": v.clone() for k, v in model.named_buffers()})
    model.remove_parallel_grad_()
    step["decoder_grad_after_projection"] = model.decoder_rows().grad.clone()
    steered = model.steer_l0_(0.25)
    step.update({f"after_steer.{k}": p.detach().clone() for k, p in model.named_parameters()})
    return {k: v.contiguous() for k, v in step.items()}, {"steers_l0": steered, "loss_keys": list(out.losses)}


def split_model(case):
    """The binding recipe's split-phase SAE, built from a seeded, trained-looking bound model."""
    torch.manual_seed(0)
    bound = build(case)
    trained_looking(bound, 500 + index(case))
    split_sae = getattr(sae.recipes.binding, "split_sae", None) or _split_sae_d32c068
    return split_sae(bound)


def _split_sae_d32c068(bound):
    """The split phase as sae/recipes/binding.py built it inline at d32c068."""
    from sae.core.architectures.binding import RULE_BASES  # exists only in that code

    cfg = bound.cfg
    flat_cls = RULE_BASES[cfg.sparsity]
    names = {f.name for f in fields(flat_cls.Config)}
    flat_opts = {**{k: v for k, v in vars(cfg).items() if k in names}, "n_latents": cfg.n_total}
    if cfg.sparsity == "topk_per_slot":
        flat_opts["k"] = cfg.k * cfg.n_slots
    split = flat_cls(**flat_opts)
    with torch.no_grad():
        split.load_decoder(bound.flat_decoder(), None)
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(split, name).copy_(getattr(bound, name))
    return split


def tensors(state):
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    meta = {}
    for case, (arch, options) in CASES.items():
        model, x = saved_model(case)
        if (out / case).exists():
            shutil.rmtree(out / case)
        model.save(out / case)
        with torch.no_grad():
            result = model(x)
        save_file({"x": x, "codes": result.codes.contiguous(), "x_hat": result.x_hat.contiguous()},
                  str(out / f"{case}.outputs.safetensors"))
        fresh = initial_model(case)
        save_file(tensors(fresh.state_dict()), str(out / f"{case}.init.safetensors"))
        step, info = training_step(case)
        save_file(step, str(out / f"{case}.step.safetensors"))
        meta[case] = {"architecture": arch, "options": options, "class": type(fresh).__name__,
                      "state_dict_keys": list(fresh.state_dict()), "parameters": [k for k, _ in fresh.named_parameters()],
                      "config_dict": fresh.config_dict(), "saelens_fields": fresh.saelens_fields(), **info}
        if arch == "binding":
            split = split_model(case)
            save_file(tensors(split.state_dict()), str(out / f"{case}.split.safetensors"))
            meta[case]["split"] = {"architecture": split.architecture, "config_dict": split.config_dict()}
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
