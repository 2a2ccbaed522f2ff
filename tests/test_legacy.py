"""What earlier code wrote and computed still holds (fixtures: tests/data/legacy_dictionaries, made
at commit d32c068, before sparsity rules became components): its saved dictionaries load with the
same codes and reconstructions and save back to the same files; a seed gives the same initial
weights under the same parameter names and order (checkpoints resume, runs reproduce); a training
step gives the same losses and gradients; the binding recipe's standard SAE is the flat SAE the
split phase built."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae

HERE = Path(__file__).resolve().parent / "data" / "legacy_dictionaries"
_spec = importlib.util.spec_from_file_location("legacy_fixtures", HERE / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)
CASES = json.loads((HERE / "cases.json").read_text())
BINDING = [case for case, entry in CASES.items() if entry["architecture"] == "binding"]


def test_the_fixtures_cover_every_architecture_and_rule():
    assert set(CASES) == set(fixtures.CASES)
    rules = {(entry["architecture"], entry["config_dict"].get("sparsity", entry["architecture"]))
             for entry in CASES.values()}
    expected = {(arch, arch) for arch in ("topk", "batchtopk", "relu", "jumprelu")}
    expected |= {("binding", rule) for rule in sae.BindingSAE.rules}
    expected |= {("matryoshka", rule) for rule in sae.MatryoshkaSAE.rules}
    assert rules == expected


# Float32 products differ in the last bits between CPUs (the fixtures were written on one machine; on
# another of this project's machines, with AVX-512, binding and Matryoshka outputs, initial encoders
# derived through M and training-step values came out up to 4 float32 epsilons of the tensor's
# largest entry away). So values must agree to 8 epsilons of that scale, not bit for bit: a wrong
# draw, term or parameter order moves entries by orders of magnitude more. Integers must be equal.
FLOAT32_EPS = 8 * torch.finfo(torch.float32).eps


def same(got, want, name=""):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if not got.dtype.is_floating_point:
        assert torch.equal(got, want), name
        return
    error, tol = float((got.double() - want.double()).abs().max()), FLOAT32_EPS * float(want.abs().max())
    assert error <= tol, f"{name}: {error:.3g} from the fixture (allowed {tol:.3g})"


@pytest.mark.parametrize("case", list(CASES))
def test_saved_dictionaries_load_with_the_same_outputs_and_save_back_the_same(case, tmp_path):
    model = sae.load(HERE / case)
    expected = load_file(str(HERE / f"{case}.outputs.safetensors"))
    with torch.no_grad():
        out = model(expected["x"])
    assert torch.equal(out.codes > 0, expected["codes"] > 0)
    same(out.codes, expected["codes"])
    same(out.x_hat, expected["x_hat"])
    same(model.encode(expected["x"]), expected["codes"])
    saved = json.loads((HERE / case / "cfg.json").read_text())
    assert model.architecture == saved["sae"]["architecture"]
    assert model.config_dict() == saved["sae"]["config"]
    model.save(tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in (HERE / case).iterdir())
    assert json.loads((tmp_path / "again" / "cfg.json").read_text()) == saved
    for file in (HERE / case).glob("*.safetensors"):
        before, after = load_file(str(file)), load_file(str(tmp_path / "again" / file.name))
        assert before.keys() == after.keys()
        for name in before:
            same(after[name], before[name], name)


@pytest.mark.parametrize("case", list(CASES))
def test_a_seed_gives_the_initial_weights_of_before(case):
    entry = CASES[case]
    model = fixtures.initial_model(case)
    assert list(model.state_dict()) == entry["state_dict_keys"]
    assert [name for name, _ in model.named_parameters()] == entry["parameters"]
    expected = load_file(str(HERE / f"{case}.init.safetensors"))
    for name, value in model.state_dict().items():
        same(value, expected[name], name)
    assert model.config_dict() == entry["config_dict"]
    assert model.saelens_fields() == entry["saelens_fields"]
    # the same model from a rule object: sparsity=TopK(k=3) instead of sparsity="topk", k=3
    rule = model.sparsity
    options = {k: v for k, v in entry["options"].items() if k != "sparsity" and k not in rule.option_names()}
    torch.manual_seed(0)
    again = sae.SAE.registry[entry["architecture"]](fixtures.D_IN, fixtures.N, sparsity=type(rule)(**vars(rule)),
                                                    **options)
    assert again.cfg == model.cfg and again.config_dict() == entry["config_dict"]
    for name, value in again.state_dict().items():
        same(value, expected[name], name)


# Gradients are sums over tokens and pairs; the sparse backward (pairs sorted by latent, segment
# sums) adds them in another order than the code that wrote the fixtures, so float32 gradients may
# differ in the last bits. They are checked against the same step in float64 instead: today's and
# the fixture's values must both lie within FLOAT32_EPS of the tensor's largest entry from it
# (observed: at most 2.2; a dropped or wrong term moves an entry by ~1/B of the scale, ~1e-2 here).


def training_step_float64(case):
    """fixtures.training_step's gradients, computed in float64 from the same float32 start."""
    torch.manual_seed(0)
    model = fixtures.build(case, dead_tokens=fixtures.DEAD_TOKENS).train()
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_(0, 0.3)
        model.tokens_since_fired[::3] = 10
    x = torch.randn(16, fixtures.D_IN, generator=torch.Generator().manual_seed(400 + fixtures.index(case))) * 2
    model = model.double()
    model(x.double()).loss.backward()
    step = {f"grad.{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.remove_parallel_grad_()
    step["decoder_grad_after_projection"] = model.decoder_rows().grad.clone()
    return step


def within_float32_rounding(got, want, ref64):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = FLOAT32_EPS * float(ref64.abs().max())
    for value in (got, want):
        error = float((value.double() - ref64).abs().max())
        assert error <= tol, f"{error:.3g} from float64 (allowed {tol:.3g})"


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_computes_what_it_did(case):
    step, info = fixtures.training_step(case)
    expected = load_file(str(HERE / f"{case}.step.safetensors"))
    assert info == {"steers_l0": CASES[case]["steers_l0"], "loss_keys": CASES[case]["loss_keys"]}
    assert step.keys() == expected.keys()
    # JumpReLU computes its threshold step in float32 by design: no float64 twin, exact comparison.
    ref64 = {} if "jumprelu" in case else training_step_float64(case)
    for name in expected:
        if name in ref64:
            within_float32_rounding(step[name], expected[name], ref64[name])
        else:
            same(step[name], expected[name])


@pytest.mark.parametrize("case", BINDING)
def test_the_recipe_starts_from_the_standard_sae_the_split_phase_built(case):
    # The recipe no longer splits a trained bound model (it trains a standard SAE from scratch, then
    # looks for slots in it), so the split phase's weights have no successor; its architecture and
    # options do: the standard SAE must be the flat SAE of the same rule and options as before.
    standard = sae.recipes.binding.standard_sae(fixtures.build(case))
    assert standard.architecture == CASES[case]["split"]["architecture"]
    assert standard.config_dict() == CASES[case]["split"]["config_dict"]