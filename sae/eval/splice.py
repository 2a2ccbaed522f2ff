"""Loss recovered by splicing a dictionary into its model (sae/lm/splice.py), from the command line.

    python -m sae.eval.splice runs/topk-x [--model scenes] [--n-sequences 512] [--out splice.json]
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sae.core.config import argument, option, parse_config
from sae.core.files import write_result
from sae.lm.splice import load_for_eval, make_batches, output_hook, resolve_sae_dir, splice_eval


@dataclass
class SpliceConfig:
    path: str = argument("dictionary directory (cfg.json) or run directory (sae/cfg.json)")
    model: str = option("", "model id ('' = the dictionary's metadata.model_name)")
    hook: str = option("", "hook name ('' = the dictionary's metadata.hook_name)")
    hook_out: str = option("", "transcoders: the hook replaced ('' = the dictionary's metadata.hook_name_out)")
    source: str = option("", "'generator' (scenes) or a .txt/.jsonl/.npy/.safetensors file "
                             "('' = generator for scenes, the shipped sae/lm/data/english.txt otherwise)")
    split: str = option("test", "scenes generator split (held-out scenes by default)")
    n_sequences: int = option(512, "sequences to evaluate")
    seq_len: int = option(0, "text sources: tokens per sequence (0 = model n_ctx; batches are cut to their longest)")
    batch_size: int = option(64, "sequences per forward pass")
    seed: int = option(12345, "generator seed (not the cache's default 0: held-out scenes)")
    error_term: bool = option(False, "also run SAE + error term, which must reproduce the clean model")
    device: str = option("cpu", "device for model and SAE")
    out: str = option("", "write the result as JSON here ('' = print only)")


def format_result(res: dict) -> str:
    hooks = f"{res['hook']} -> {res['hook_out']}" if "hook_out" in res else res["hook"]
    lines = [f"hook {hooks}  objective {res['objective']}  sequences {res['n_sequences']}  "
             f"spliced rows {res['n_spliced_rows']}  FVU {res['reconstruction']['fvu']:.4f}  L0 {res['reconstruction']['l0']:.1f}"]
    for scope, d in res["scopes"].items():
        metrics = sorted({k.rsplit("_", 1)[0] for k in d if "_recovered_" not in k and k.rsplit("_", 1)[-1] in res["conditions"]})
        lines.append(f"[{scope}] (n={d['n']})")
        lines.append(f"  {'metric':<9}" + "".join(f"{c:>11}" for c in res["conditions"]) + f"{'rec(zero)':>11}{'rec(mean)':>11}")
        for m in metrics:
            lines.append(f"  {m:<9}" + "".join(f"{d[f'{m}_{c}']:11.4f}" for c in res["conditions"])
                         + f"{d[f'{m}_recovered_zero']:11.4f}{d[f'{m}_recovered_mean']:11.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_config(SpliceConfig, argv, "python -m sae.eval.splice", __doc__.split("\n\n")[0], positional=("path",))
    try:
        if cfg.n_sequences <= 0 or cfg.batch_size <= 0:
            raise ValueError("--n-sequences and --batch-size must be positive")
        sae, model, model_id, hook, sae_cfg = load_for_eval(cfg.path, cfg.model, cfg.hook, cfg.device)
        hook_out = output_hook(sae, sae_cfg, cfg.hook_out)
        batches = make_batches(model_id, model, cfg.source, cfg.n_sequences, cfg.batch_size, cfg.split, cfg.seed, cfg.seq_len)
        res = splice_eval(model, sae, hook, batches, error_term=cfg.error_term, progress=True, hook_out=hook_out)
        res.update(model=model_id, sae=str(resolve_sae_dir(Path(cfg.path))), config=asdict(cfg))
    except (ValueError, OSError, ImportError) as e:  # sae.core.io.LoadError and sae.core.store.CacheError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(res))
    if cfg.out:
        write_result(Path(cfg.out), res)
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
