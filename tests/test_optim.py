"""sae.core.optim: fused Adam on every device torch has it for, the step after backward, determinism
and bit-identical resume (a test-local loop, and the real trainer killed and resumed with it)."""
import copy
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.core.optim import FusedAdam, make_optimizer, match_layouts_, optimizer_step
from sae.core import trainer
from sae.core.trainer import TrainConfig


def data(n=2048, d=16, atoms=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    codes = (torch.rand(n, atoms, generator=g) < 3 / atoms) * (1 + torch.rand(n, atoms, generator=g))
    return codes @ dictionary * 4 + 1.0


def model_and_optimizer(seed=0, **options):
    torch.manual_seed(seed)
    model = sae.TopKSAE(16, 96, k=4, dead_tokens=256, **options).train()
    return model, make_optimizer(model, TrainConfig(lr=3e-3), "cpu")


def train(model, optimizer, x, steps, start=0, batch=128):
    for s in range(start, start + steps):
        out = model(x[(s * batch) % len(x):][:batch])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer_step(model, optimizer, grad_clip=1.0)


def test_the_trainer_steps_with_make_optimizer_and_optimizer_step():
    seen = []
    model = sae.TopKSAE(16, 64, k=4)
    sae.train(model, data(512), steps=3, batch_size=128, lr=3e-3, log_every=1,
              callback=lambda step, logs: seen.append(step))
    assert seen == [1, 2, 3]
    norms = model.W_dec.norm(dim=1)  # unit-norm rows, then the activation scale folded into all alike
    torch.testing.assert_close(norms, norms[:1].expand(64))
    cfg = TrainConfig(lr=3e-3, batch_size=128)
    readers = trainer.open_readers(data(512), cfg, {cfg.hook})
    member = trainer.make_member("", sae.TopKSAE(16, 64, k=4), readers, cfg, cfg.hook, None, None, torch.device("cpu"))
    assert isinstance(member.optimizer, FusedAdam)


def test_make_optimizer_takes_the_fused_kernel_on_cpu():
    model, optimizer = model_and_optimizer()
    assert isinstance(optimizer, FusedAdam) and optimizer.defaults["fused"]
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-3 and group["betas"] == (0.9, 0.999)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_fused_adam_is_torchs_fused_adam_bit_for_bit():
    """Same kernel on the same pairs, without the row-major copy of W_enc's gradient; the state
    dicts are interchangeable."""
    runs = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=3e-3, fused=True), lambda ps: FusedAdam(ps, lr=3e-3)):
        torch.manual_seed(0)
        model = sae.TopKSAE(16, 96, k=4)
        assert model.W_enc.stride() == (1, 16)  # stored (n, d)-major: the case torch copies
        optimizer = make(list(model.parameters()))
        train(model, optimizer, data(), 4)
        runs.append((model, optimizer))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][key], opt_b.state[q][key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # (load_state_dict would alias a's tensors)
    train(a, opt_a, data(), 2, start=4)
    train(b, opt_b, data(), 2, start=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_fused_adam_matches_the_default_adam_up_to_rounding():
    runs = []
    for kind in ({"fused": True}, {"foreach": False}):
        torch.manual_seed(0)
        model = sae.TopKSAE(16, 96, k=4)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, **kind)
        train(model, optimizer, data(), 5)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_gradient_in_another_layout_than_its_parameter_is_stepped_correctly():
    """torch's CPU fused Adam pairs the wrong elements when a transposed parameter's gradient is
    row-major; optimizer_step gives the gradient its parameter's layout first."""
    base, grad = torch.randn(40, 12), torch.randn(12, 40)
    results = []
    for fused in (True, False):
        W = torch.nn.Parameter(base.clone().t())  # stored (n, d)-major, as W_enc is
        optimizer = torch.optim.Adam([W], lr=0.1, fused=fused)
        for _ in range(3):
            W.grad = grad.clone()  # row-major (d, n): not W's layout
            match_layouts_(optimizer)
            assert W.grad.stride() == W.stride()
            optimizer.step()
        results.append(W.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_optimizer_step_projects_and_renormalises_the_decoder_rows():
    model, optimizer = model_and_optimizer()
    x = data()[:128]
    model(x).loss.backward()
    g, W = model.W_dec.grad.clone(), model.W_dec.detach().clone()
    model.remove_parallel_grad_()
    expected = g - (g * W).sum(1, keepdim=True) * W
    torch.testing.assert_close(model.W_dec.grad, expected, rtol=1e-5, atol=1e-6)
    assert (model.W_dec.grad * W).sum(1).abs().max() < 1e-5
    optimizer.step()
    model.normalize_decoder_()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(96))


@pytest.mark.parametrize("aux", [False, True], ids=["plain", "auxk-active"])
def test_training_is_deterministic_and_resumes_bit_identically(aux):
    x = data()
    options = {"aux_k": 8, "aux_coeff": 1.0} if aux else {"aux_coeff": 0.0}
    model, optimizer = model_and_optimizer(**options)
    train(model, optimizer, x, 12)
    if aux:
        assert model.dead_mask().any(), "the run should have dead latents, so AuxK ran"

    again, opt_again = model_and_optimizer(**options)
    train(again, opt_again, x, 12)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    first, opt_first = model_and_optimizer(**options)
    train(first, opt_first, x, 7)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved)
    for per_param in state["optimizer"]["state"].values():  # as safetensors stores them (io.save_checkpoint)
        per_param.update({k: v.contiguous() for k, v in per_param.items()})
    resumed, opt_resumed = model_and_optimizer(seed=123, **options)  # other initial weights: all must come from the file
    resumed.load_state_dict(state["model"])
    opt_resumed.load_state_dict(state["optimizer"])
    train(resumed, opt_resumed, x, 5, start=7)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], opt_resumed.state[q][key]), key


# The real loop (which builds its optimiser with make_optimizer), killed without warning and resumed.
RESUME = textwrap.dedent("""
    import os, signal, sys, torch, sae
    sys.path.insert(0, {tests!r})
    from test_optim import data
    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    model = sae.TopKSAE(16, 64, k=4, dead_tokens=300, aux_k=8, aux_coeff=1.0)

    def die(step, logs):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sae.train(model, data(), steps=30, batch_size=128, lr=3e-3, run_dir=run_dir, checkpoint_every=5,
              log_every=3, resume=resume, callback=die)
""")


def test_the_trainer_with_the_fused_optimizer_resumes_bit_identically_after_sigkill(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME.format(tests=str(Path(__file__).parent)))

    def run(run_dir, kill_at=-1, resume=False):
        return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_at), "1" if resume else "0"],
                              capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    killed = run(tmp_path / "killed", kill_at=17)
    assert killed.returncode != 0
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "sae" / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
