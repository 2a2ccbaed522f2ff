"""eval/binding_bench.py end to end at a toy size: JSON written, resumable, bad input refused."""
import json

from sae.eval import binding_bench


def test_bench_writes_resumable_json_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--worlds", "ref", "--seeds", "0", "--steps", "40", "--n-train", "2048", "--batch-size", "128",
            "--out", str(out)]
    saved = ["--save", str(tmp_path / "saes")]
    assert binding_bench.main(args + saved) == 0
    assert (tmp_path / "saes" / "ref" / "0" / "standard").is_dir()
    # the echo columns can be recomputed from the saved SAEs without training
    assert binding_bench.main(args + saved + ["--rescore-echo"]) == 0
    assert binding_bench.main(args + ["--rescore-echo"]) == 2
    out.unlink()
    assert binding_bench.main(args) == 0
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert run["world"] == "ref" and {"standard", "binding", "binding_plain"} <= set(run)
    for key in ("fvu", "eff_mmcs", "swap", "ho_coverage"):
        assert 0 <= run["binding"][key] <= 1.0 + 1e-6 and key in run["standard"]
    assert "echo_share" in run["standard"] and "rebind_pairs" in run["binding"]
    assert report["summary"]["ref"]["binding"]["fvu"][2] == 1
    assert "| ref | binding |" in capsys.readouterr().out
    # a second call finds the run done and trains nothing
    assert binding_bench.main(args) == 0 and json.loads(out.read_text())["runs"] == report["runs"]
    assert binding_bench.main(args[:-6] + ["--steps", "50", "--n-train", "2048", "--batch-size", "128",
                                           "--out", str(out)]) == 2
    assert binding_bench.main(["--worlds", "nowhere", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown world 'nowhere'" in capsys.readouterr().err
