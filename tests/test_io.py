"""Dictionaries round-trip through our files and SAELens'; bad files fail with one clear error."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae
from sae.core.files import OutputError
from sae.core.io import LoadError

ARCHS = [(sae.TopKSAE, {"k": 3}), (sae.BatchTopKSAE, {"k": 3}), (sae.JumpReLUSAE, {}), (sae.ReLUSAE, {})]


def trained_looking(cls, options):
    torch.manual_seed(0)
    model = cls(10, 40, **options)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.5)
        model.b_dec.normal_()
        if isinstance(model, sae.BatchTopKSAE):
            model.threshold.fill_(0.2)
    return model.eval()


@pytest.mark.parametrize("cls,options", ARCHS)
def test_round_trip_keeps_architecture_config_and_outputs(tmp_path, cls, options):
    model = trained_looking(cls, options)
    density = torch.linspace(-5, 0, 40)
    model.save(tmp_path / "d", metadata={"hook_name": "blocks.0.hook_resid_post"}, log_feature_density=density)
    loaded = sae.load(tmp_path / "d")
    assert type(loaded) is cls and loaded.cfg == model.cfg
    x = torch.randn(6, 10)
    torch.testing.assert_close(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat)
    torch.testing.assert_close(sae.core.io.load_sparsity(tmp_path / "d"), density)
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary leftovers


@pytest.mark.parametrize("cls,options", ARCHS)
def test_saelens_reads_ours_and_we_read_saelens(tmp_path, cls, options):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed")
    model = trained_looking(cls, options)
    model.save(tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    x = torch.randn(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), model.encode(x))
        torch.testing.assert_close(theirs(x), model(x).x_hat, rtol=1e-5, atol=1e-5)
    theirs.save_model(str(tmp_path / "theirs"))
    back = sae.load(tmp_path / "theirs")
    torch.testing.assert_close(back.encode(x), model.encode(x))


def test_saelens_topk_variants_are_folded_exactly(tmp_path):
    """SAELens options we do not have (decoder-norm rescaling, no b_dec on input) fold into weights."""
    torch.manual_seed(0)
    d, n, k = 6, 20, 3
    w = {"W_enc": torch.randn(d, n), "W_dec": torch.randn(n, d) * 3, "b_enc": torch.randn(n), "b_dec": torch.randn(d)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d, "d_sae": n, "k": k, "rescale_acts_by_decoder_norm": True,
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0"}}))
    model = sae.load(tmp_path)
    x = torch.randn(5, d)
    norms = w["W_dec"].norm(dim=1)
    pre = (x @ w["W_enc"] + w["b_enc"]) * norms
    top = pre.topk(k)
    acts = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    torch.testing.assert_close(model.encode(x), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x).x_hat, (acts / norms) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def test_save_replaces_an_existing_dictionary_atomically(tmp_path):
    first, second = trained_looking(sae.TopKSAE, {"k": 3}), sae.TopKSAE(10, 40, k=4)
    first.save(tmp_path / "d")
    second.save(tmp_path / "d")
    assert sae.load(tmp_path / "d").cfg.k == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.fixture
def saved(tmp_path):
    trained_looking(sae.JumpReLUSAE, {}).save(tmp_path / "d")
    return tmp_path / "d"


def test_truncated_weights_are_reported(saved):
    data = (saved / "sae_weights.safetensors").read_bytes()
    (saved / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="sae_weights.safetensors: corrupt or truncated"):
        sae.load(saved)


def test_corrupt_cfg_is_reported(saved):
    (saved / "cfg.json").write_text("{not json")
    with pytest.raises(LoadError, match="cfg.json: not valid JSON"):
        sae.load(saved)


def test_unknown_architecture_is_reported(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["sae"]["architecture"] = "gated-ternary"
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unknown architecture 'gated-ternary'"):
        sae.load(saved)
    del cfg["sae"]
    cfg["architecture"] = "matching_pursuit"
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unknown architecture 'matching_pursuit'"):
        sae.load(saved)


def test_weights_that_do_not_fit_the_config_are_reported(saved):
    weights = load_file(str(saved / "sae_weights.safetensors"))
    weights["W_dec"] = weights["W_dec"][:, :-1].contiguous()
    save_file(weights, str(saved / "sae_weights.safetensors"))
    with pytest.raises(LoadError, match=r"W_dec has shape \(40, 9\), cfg.json implies \(40, 10\)"):
        sae.load(saved)
    del weights["W_dec"]
    save_file(weights, str(saved / "sae_weights.safetensors"))
    with pytest.raises(LoadError, match="expected tensors"):
        sae.load(saved)


def test_nan_weights_are_reported(saved):
    weights = load_file(str(saved / "sae_weights.safetensors"))
    weights["b_enc"][3] = float("nan")
    save_file(weights, str(saved / "sae_weights.safetensors"))
    with pytest.raises(LoadError, match="b_enc contains NaN"):
        sae.load(saved)


def test_missing_directory_and_files_are_reported(tmp_path, saved):
    with pytest.raises(LoadError, match="not a directory"):
        sae.load(tmp_path / "nope")
    (saved / "sae_weights.safetensors").unlink()
    with pytest.raises(LoadError, match="sae_weights.safetensors: file not found"):
        sae.load(saved)


def test_invalid_options_in_cfg_are_reported(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["sae"]["config"]["bandwidth"] = -1
    (saved / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="invalid config for jumprelu"):
        sae.load(saved)


def test_save_never_deletes_a_users_files(tmp_path):
    model = trained_looking(sae.TopKSAE, {"k": 3})
    folder = tmp_path / "paper"
    (folder / "figures").mkdir(parents=True)
    (folder / "main.tex").write_text("\\documentclass{article}")
    (folder / "figures" / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(OutputError, match="holds files that are not a dictionary"):
        model.save(folder)
    assert (folder / "main.tex").read_text() == "\\documentclass{article}"
    assert (folder / "figures" / "data.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in folder.iterdir()) == ["figures", "main.tex"]

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        model.save(notes)
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "paper"]

    model.save(tmp_path / "d")  # a dictionary with the user's file beside its own: not ours to replace
    (tmp_path / "d" / "README.md").write_text("my notes on this dictionary")
    with pytest.raises(OutputError, match="not a dictionary"):
        model.save(tmp_path / "d")
    assert (tmp_path / "d" / "README.md").exists()

    (tmp_path / "empty").mkdir()
    model.save(tmp_path / "empty")
    assert sae.load(tmp_path / "empty").cfg.k == 3


def test_a_saelens_folder_is_not_replaced(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 10, "d_sae": 40}))
    save_file({"W_enc": torch.zeros(10, 40)}, str(d / "sae_weights.safetensors"))
    with pytest.raises(OutputError):
        trained_looking(sae.TopKSAE, {"k": 3}).save(d)
    assert json.loads((d / "cfg.json").read_text())["architecture"] == "standard"


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_dictionaries_and_runs_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        trained_looking(sae.BindingSAE, {"k": 3}).save(tmp_path / "d")
        sae.train(sae.TopKSAE(10, 40, k=3), torch.randn(512, 10), steps=3, batch_size=64, run_dir=str(tmp_path / "r"))
    finally:
        os.umask(old)
    paths = [tmp_path / "d", *(tmp_path / "d").iterdir(), *(tmp_path / "r").rglob("*")]
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (dir_mode if p.is_dir() else file_mode), p
