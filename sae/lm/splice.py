"""Loss recovered by splicing: run the model with the SAE's reconstruction in place of a hooked
activation, and measure what that costs against the clean model and two ablation baselines.

    res = splice_eval(model, sae, "blocks.1.hook_resid_post", batches)
    python -m sae.eval.splice runs/topk-x [--model scenes] [--n-sequences 512] [--out splice.json]

Conditions, each one forward pass per batch with `hook` replaced through sae.lm.attach (`attached`
for the dictionary, `replacing` for the ablations):
    clean    no intervention
    sae      activation -> SAE reconstruction x_hat
    zero     activation -> 0                        (SAEBench's baseline)
    mean     activation -> its mean over the evaluated rows (a kinder baseline: the model still
             sees a typical vector, only the token-specific part is gone)
    error    activation -> x_hat + (x - x_hat), the SAE plus its error term: must reproduce the
             clean model (up to float rounding); it is the base for causal edits through the SAE
Only the rows a cache would store are replaced (not BOS, PAD or the tokenizer's other special
tokens): the SAE is judged where it was trained. For every metric m and baseline b,
    recovered_b(m) = (m_b - m_sae) / (m_b - m_clean)     (1 = as good as clean, 0 = as bad as b)
which for CE is SAEBench's ce_loss_score (b = zero) and for KL (m_clean = 0) its kl_div_score.

What is measured depends on the model:
  causal LMs     next-token CE and KL(clean || spliced) over all predicted positions ("all");
                 for the built-in scenes model also at the query answers only ("answers"; the
                 model's actual task, see sae/scenes_model.py) with answer accuracy. It is trained
                 on the answers alone, so its "all" CE is no loss it was trained for (worse than
                 uniform): read "answers" for it.
  encoders       all-MiniLM-L6-v2 ships without its masked-LM head, so there is no token loss to
  (MiniLM)       measure. The model's product is the sentence embedding (mean pool + normalise),
                 so "embedding": emb_loss = 1 - cos(clean, spliced embedding), and sim_err = mean
                 |change| of the pairwise cosine similarities within a batch (what retrieval and
                 similarity search consume); both are 0 for the clean model.

SAEs trained by sae.train see x * scale during training (sae/trainer.py); pass `scale` to
evaluate one mid-training (make_splice_callback does): x_hat = sae(x * scale) / scale.

A transcoder (hook_out given) reads `hook` and replaces `hook_out` with its prediction: every
condition (and the ablations' zero and mean) then acts on the OUTPUT hook, and the reconstruction
metrics compare the prediction with the output hook's activation. Its scale is a pair (input, target).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.core.architectures.transcoder import is_transcoder
from sae.core.io import load
from sae.core.metrics import RunningStats
from sae.lm import models
from sae.lm.attach import attached, replacing
from sae.lm.cache import CacheConfig, check_config, open_source
from sae.lm.minilm import mean_pool
from sae.lm.scenes import sample_batch

ENGLISH = Path(__file__).resolve().parent / "data" / "english.txt"  # shipped real English (a few KB)


@dataclass
class TokenBatch:
    tokens: torch.Tensor           # (B, T) long
    splice: torch.Tensor           # (B, T) bool: rows the SAE replaces
    targets: torch.Tensor          # (B, T) bool: tokens worth predicting (not padding, BOS or the scenes PAD)
    answer_pos: torch.Tensor | None = None  # (B, Q) scenes: positions of the answers
    answers: torch.Tensor | None = None     # (B, Q) scenes: answer token ids


# -----------------------------------------------------------------------------
# token batches

def make_batches(model_id: str, model, source: str = "", n_sequences: int = 512, batch_size: int = 64,
                 split: str = "test", seed: int = 12345, seq_len: int = 0) -> list[TokenBatch]:
    """Token batches for splicing, with the same row selection as sae.lm.cache (drop_bos on)."""
    out = list(iter_batches(model_id, model, source, n_sequences, batch_size, split, seed, seq_len))
    if not out:
        raise ValueError(f"source {source}: no sequences")
    return out


def iter_batches(model_id: str, model, source: str = "", n_sequences: int = 512, batch_size: int = 64,
                 split: str = "test", seed: int = 12345, seq_len: int = 0):
    """make_batches one batch at a time, so a long source is never held whole (the dashboards
    stream a dictionary's data through this when there is no cache)."""
    source = source or ("generator" if model_id == models.BUILTIN else str(ENGLISH))
    cfg = CacheConfig(model=model_id, source=source, n_sequences=n_sequences, split=split, seed=seed,
                      seq_len=seq_len, hooks=["unused"], out="unused")
    check_config(cfg)  # one-line errors for a missing file, a wrong suffix, generator for a non-scenes model
    try:
        tok = models.get_tokenizer(model_id, model)
    except (ValueError, ImportError):
        tok = None
    src = open_source(cfg, tok, model.cfg.n_ctx)
    drop, no_target = _unscored_tokens(model_id, tok)
    scenes = None
    if source == "generator":
        scenes = sample_batch(src.n_sequences, seed, split)  # the generator source's own scenes (same call)
    for b, toks, lengths in src.batches(0, batch_size):
        if source != "generator":  # drop the batch's all-padding tail columns (nothing there to score)
            toks = toks[:, : int(lengths.max())]
        valid = torch.arange(toks.shape[1]) < lengths[:, None]
        splice = valid & ~torch.isin(toks, torch.tensor(drop, dtype=toks.dtype))
        targets = valid & ~torch.isin(toks, torch.tensor(no_target, dtype=toks.dtype))
        if tok is None:  # token arrays without a tokenizer: BOS by convention at 0
            splice[:, 0] = targets[:, 0] = False
        batch = TokenBatch(toks, splice, targets)
        if scenes is not None:
            rows = slice(b * batch_size, b * batch_size + len(toks))
            assert torch.equal(scenes.tokens[rows], toks), "scenes generator and cache source disagree"
            batch.answer_pos, batch.answers = scenes.answer_pos[rows], scenes.answers[rows]
        yield batch


def _unscored_tokens(model_id: str, tok) -> tuple[list[int], list[int]]:
    """(token ids never spliced, token ids never predicted): BOS and the tokenizer's other special
    tokens, as the cache drops them; the scenes model's PAD carries nothing and predicts nothing."""
    bos = tok.bos_token_id if tok is not None else None
    drop = [t for t in (bos, *getattr(tok, "drop_token_ids", ())) if t is not None]
    no_target = [t for t in (bos,) if t is not None]
    if model_id == models.BUILTIN:
        drop.append(tok.pad_token_id)
        no_target.append(tok.pad_token_id)
    return drop, no_target


# -----------------------------------------------------------------------------
# the evaluation

def is_encoder(model) -> bool:
    return getattr(model.cfg, "attention_dir", "causal") == "bidirectional"


def _lm_metrics(logits, clean_logits, batch: TokenBatch) -> dict:
    """Per-scope sums: next-token CE and KL(clean || this) over all predicted positions, and at
    the scenes answers (CE, KL, accuracy)."""
    out = {}
    lp, lpc = logits.float().log_softmax(-1), clean_logits.float().log_softmax(-1)
    toks = batch.tokens.to(logits.device)
    target_ok = batch.targets[:, 1:].to(logits.device)
    ce = -lp[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]
    kl = (lpc.exp() * (lpc - lp)).sum(-1)
    out["all"] = {"ce": ce[target_ok].sum().item(), "kl": kl[:, :-1][target_ok].sum().item(), "n": int(target_ok.sum())}
    if batch.answer_pos is not None:
        pos = (batch.answer_pos - 1).to(logits.device)  # the prompt's last word predicts the answer
        la = lp.gather(1, pos[..., None].expand(-1, -1, lp.shape[-1]))
        lca = lpc.gather(1, pos[..., None].expand(-1, -1, lp.shape[-1]))
        ans = batch.answers.to(logits.device)
        out["answers"] = {"ce": -la.gather(-1, ans[..., None]).sum().item(),
                          "kl": (lca.exp() * (lca - la)).sum().item(),
                          "acc": (la.argmax(-1) == ans).sum().item(), "n": ans.numel()}
    return out


def _encoder_metrics(hidden, clean_hidden, batch: TokenBatch, pad_id) -> dict:
    toks = batch.tokens.to(hidden.device)
    e = F.normalize(mean_pool(hidden.float(), toks, pad_id), dim=-1)
    c = F.normalize(mean_pool(clean_hidden.float(), toks, pad_id), dim=-1)
    B = len(e)
    off = ~torch.eye(B, dtype=torch.bool, device=e.device)
    sim_err = ((e @ e.T) - (c @ c.T)).abs()[off]
    return {"embedding": {"emb_loss": (1 - (e * c).sum(-1)).sum().item(), "n": B,
                          "sim_err": sim_err.sum().item(), "n_pairs": int(off.sum())}}


@torch.no_grad()
def splice_eval(model, sae, hook: str, batches: list[TokenBatch], *, scale: float | tuple = 1.0,
                error_term: bool = False, on_rows=None, progress: bool = False, hook_out: str | None = None) -> dict:
    """Loss recovered by splicing `sae` into `model` at `hook` over `batches` (see module doc); a
    transcoder reads `hook` and replaces `hook_out`. `on_rows(x, x_hat, codes, batch_index,
    seq_of_row)` is called in the SAE condition with the replaced rows (x_hat in x's units; codes
    as the SAE produced them), for extra statistics."""
    models.check_hook_names(model, [hook] + ([hook_out] if hook_out else []))
    key, replaced = ((hook, hook_out), hook_out) if hook_out else (hook, hook)
    was_training = sae.training
    sae.eval()
    encoder = is_encoder(model)
    pad_id = getattr(model, "pad_id", 0)  # encoders: padding is left out of the mean pool
    conditions = ["clean", "sae", "zero", "mean"] + (["error"] if error_term else [])
    sums: dict = {c: {} for c in conditions}
    stats = RunningStats(sae.n_total)
    try:
        mean, count = _mean_activation(model, replaced, batches, sae.d_out if hook_out else sae.d_in)
        ablations = {"zero": lambda name, x: torch.zeros_like(x),
                     "mean": lambda name, x: mean.to(x.device, x.dtype).expand_as(x).clone()}
        bar = tqdm(batches, desc=f"splice {replaced}", disable=not progress, dynamic_ncols=True)
        for bi, b in enumerate(bar):
            clean = model(b.tokens)

            def sae_rows(name, x, x_hat, codes, bi=bi, b=b):
                stats.update(x, x_hat, codes.to(x.device))
                if on_rows is not None:
                    on_rows(x, x_hat, codes, bi, b.splice.nonzero()[:, 0])

            for c in conditions:
                if c == "clean":
                    out = clean
                elif c in ablations:
                    with replacing(model, {replaced: ablations[c]}, positions=b.splice):
                        out = model(b.tokens)
                else:  # the dictionary itself, or it plus its error term
                    with attached(model, {key: sae}, positions=b.splice, scale=scale, error_term=c == "error",
                                  on_rows=sae_rows if c == "sae" else None):
                        out = model(b.tokens)
                m = _encoder_metrics(out, clean, b, pad_id) if encoder else _lm_metrics(out, clean, b)
                for scope, d in m.items():
                    acc = sums[c].setdefault(scope, {})
                    for k, v in d.items():
                        acc[k] = acc.get(k, 0) + v
    finally:
        sae.train(was_training)
    result = {"hook": hook, **({"hook_out": hook_out} if hook_out else {}),
              "objective": "sentence_embedding" if encoder else "next_token",
              "n_sequences": sum(len(b.tokens) for b in batches), "n_spliced_rows": count, "scale": scale,
              "conditions": conditions, "scopes": {}, "reconstruction": stats.summary()}
    result["scopes"] = {scope: _recovered(sums, scope, conditions) for scope in sums["clean"]}
    return result


def _mean_activation(model, hook: str, batches: list[TokenBatch], d_in: int) -> tuple[torch.Tensor, int]:
    """(mean, rows): the mean activation over the rows that get replaced, the mean-ablation vector."""
    total, count = None, 0
    for b in batches:
        act = models.hook_activations(model, b.tokens, [hook])[hook]
        a = act[b.splice.to(act.device)].double()
        total = a.sum(0) if total is None else total + a.sum(0)
        count += len(a)
    if count == 0:
        raise ValueError("no rows to splice: every position is BOS/PAD/special")
    mean = (total / count).float()
    if mean.shape[-1] != d_in:
        raise ValueError(f"hook {hook} has width {mean.shape[-1]} but the SAE has d_in={d_in}")
    return mean, count


def _recovered(sums: dict, scope: str, conditions: list[str]) -> dict:
    """Per-condition means of one scope's sums, and the share each baseline's loss the SAE recovers."""
    per = {}
    for c in conditions:
        s = sums[c][scope]
        for k, v in s.items():
            if not k.startswith("n"):
                per[f"{k}_{c}"] = v / s["n_pairs" if k == "sim_err" else "n"]
    for m in sorted({k.rsplit("_", 1)[0] for k in per}):
        for base in ("zero", "mean"):
            denom = per[f"{m}_{base}"] - per[f"{m}_clean"]
            per[f"{m}_recovered_{base}"] = (per[f"{m}_{base}"] - per[f"{m}_sae"]) / denom if denom != 0 else math.nan
    per["n"] = sums["clean"][scope]["n"]
    return per


# -----------------------------------------------------------------------------
# during training

class SpliceMonitor:
    """Loss recovered for the SAE under training, every `every` steps (see make_splice_callback)."""

    def __init__(self, model, hook, batches, every, hook_out: str | None = None):
        self.model, self.hook, self.batches, self.every, self.hook_out = model, hook, batches, every, hook_out

    def __call__(self, sae, step: int, scale: float | tuple = 1.0) -> dict:
        if self.every <= 0 or step % self.every:
            return {}
        res = splice_eval(self.model, sae, self.hook, self.batches, scale=scale, hook_out=self.hook_out)
        keys = ("ce_sae", "ce_recovered_zero", "ce_recovered_mean", "kl_sae", "acc_sae", "acc_recovered_mean",
                "emb_loss_sae", "emb_loss_recovered_mean", "sim_err_sae")
        return {f"splice/{scope}/{k}": v for scope, d in res["scopes"].items() for k, v in d.items() if k in keys}


def splice_monitor(every: int, n_sequences: int):
    """For the training loop's splice_every: a factory it calls with the run's metadata (which
    names the model and hook) and device, once it knows them."""
    def make(metadata: dict, device) -> SpliceMonitor:
        model_id, hook = metadata.get("model_name"), metadata.get("hook_name")
        if not model_id or not hook:
            raise ValueError("splice_every needs the model and hook: train on an activation cache, or pass "
                             "metadata={'model_name': ..., 'hook_name': ...}")
        return make_splice_callback(model_id, hook, every, n_sequences=n_sequences, device=str(device),
                                    hook_out=metadata.get("hook_name_out"))

    return make


def make_splice_callback(model_id: str, hook: str, every: int, n_sequences: int = 64, batch_size: int = 64,
                         source: str = "", device: str = "cpu", model=None,
                         hook_out: str | None = None) -> SpliceMonitor:
    """A callable `monitor(sae, step, scale) -> dict` for the training loop: every `every` steps it
    splices the SAE under training (which sees x * scale) into `model_id` at `hook` on a fixed set
    of n_sequences held-out sequences and returns flat scalars ({"splice/all/ce_recovered_zero":
    ..., ...}) to merge into the step's logs; on other steps it returns {}. The model and the
    token batches are loaded once, here. A transcoder's monitor replaces `hook_out`."""
    model = model if model is not None else models.load_model(model_id, device)
    models.check_hook_names(model, [hook] + ([hook_out] if hook_out else []), model_id)
    return SpliceMonitor(model, hook, make_batches(model_id, model, source, n_sequences, batch_size), every, hook_out)


# -----------------------------------------------------------------------------
# dictionaries to evaluate

def resolve_sae_dir(path: Path) -> Path:
    """A dictionary directory (cfg.json) or a run directory holding one in sae/."""
    if (path / "cfg.json").is_file():
        return path
    if (path / "sae" / "cfg.json").is_file():
        return path / "sae"
    raise ValueError(f"{path}: neither a dictionary directory (cfg.json) nor a run directory (sae/cfg.json)")


def load_for_eval(path: str, model_id: str = "", hook: str = "", device: str = "cpu"):
    """(sae, model, model_id, hook, cfg.json) for a saved dictionary, with the model and hook from
    its metadata unless given."""
    sae_dir = resolve_sae_dir(Path(path))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    meta = cfg.get("metadata", {})
    model_id = model_id or meta.get("model_name") or ""
    hook = hook or meta.get("hook_name") or ""
    if not model_id:
        raise ValueError(f"{sae_dir}/cfg.json names no model (metadata.model_name): pass --model")
    if not hook:
        raise ValueError(f"{sae_dir}/cfg.json names no hook (metadata.hook_name): pass --hook")
    sae = load(sae_dir, device=device)
    model = models.load_model(model_id, device)
    models.check_hook_names(model, [hook], model_id)
    return sae, model, model_id, hook, cfg


def output_hook(sae, cfg: dict, given: str = "") -> str | None:
    """The hook a transcoder replaces (`given`, else its cfg.json's metadata.hook_name_out); None
    for any other dictionary, which replaces the hook it reads."""
    if not is_transcoder(sae):
        if given:
            raise ValueError(f"--hook-out is for transcoders; this is a {sae.architecture} SAE")
        return None
    hook_out = given or cfg.get("metadata", {}).get("hook_name_out") or ""
    if not hook_out:
        raise ValueError("the transcoder's cfg.json names no output hook (metadata.hook_name_out): pass --hook-out")
    return hook_out
