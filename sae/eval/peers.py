"""The peers' training steps, reproduced as their own trainers run them, for sae.eval.peer_bench.

    SAELens 6 (sae_lens)      SAETrainer._train_step itself, on a TopKTrainingSAE: forward with
                              the TopK aux loss, firing statistics, backward, clip_grad_norm_(1.0),
                              torch Adam, zero_grad, LR and coefficient schedulers.
    EleutherAI sparsify 1.x   the loop body of sparsify.Trainer.fit (loss_fn="fvu", one micro-batch):
                              decoder rows renormalised, SparseCoder forward (fused encoder, its
                              decoder, its AuxK from the encoder's pre-activations), backward,
                              remove_gradient_parallel_to_decoder_directions, optimizer step and
                              zero_grad, dead-latent counters. Its default optimizer (signum: SignSGD
                              in a ScheduleFreeWrapper, momentum 0.95) or Adam (+ its linear warm-up).

Both are optional (`pip install -e '.[bench]'`); a peer that is not installed is None here and the
benchmark says so. sparsify picks its decoder at import: its Triton embedding-bag when triton
imports, which fails on CPU tensors, so on a machine without a GPU SPARSIFY_DISABLE_TRITON=1 is set
before the import (its eager `embedding_bag` fallback), and a CPU run on a GPU machine selects the
same fallback explicitly. The benchmark never edits a peer's code: it calls it.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

try:
    import sae_lens
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
except ImportError:  # the bench extra is not installed
    sae_lens = None

try:
    import sparsify
    import sparsify.sparse_coder
    import sparsify.utils
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from transformers import get_linear_schedule_with_warmup
except ImportError:  # the bench extra is not installed
    sparsify = None


def available() -> dict[str, str | None]:
    """Peer name -> version, or None when it is not installed."""
    return {"saelens": getattr(sae_lens, "__version__", None) if sae_lens else None,
            "sparsify": getattr(sparsify, "__version__", None) if sparsify else None}


class SAELensStep:
    """One SAELens training step: their trainer's own _train_step."""

    name = "saelens"

    def __init__(self, d, n, k, batch_size, device, seed, lr):
        torch.manual_seed(seed)
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=str(device)))
        cfg = SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=batch_size, lr=lr,
                               lr_end=lr / 10, device=str(device), autocast=False)
        self.trainer = SAETrainer(cfg, self.sae, data_provider=iter(()))
        self.describe = f"TopKTrainingSAE, Adam lr {lr:g}, aux_loss_coefficient {self.sae.cfg.aux_loss_coefficient:g}"

    def setup(self, x):
        pass  # SAELens' trainer starts b_dec at zero

    def set_dead(self, dead):
        fired = self.trainer.n_forward_passes_since_fired
        fired.zero_()
        if dead is not None:
            fired[dead] = self.trainer.cfg.dead_feature_window + 1

    def step(self, x):
        self.trainer._train_step(self.sae, x)

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae.decode(self.sae.encode(x))


class SparsifyStep:
    """One sparsify training step, as the body of sparsify.Trainer.fit runs it for an SAE."""

    name = "sparsify"

    def __init__(self, d, n, k, batch_size, device, seed, auxk_alpha, optimizer="signum"):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        if self.device.type == "cpu" and sparsify.sparse_coder.decoder_impl is not sparsify.utils.eager_decode:
            sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode  # what SPARSIFY_DISABLE_TRITON=1 picks
        self.sae = SparseCoder(d, SparseCoderConfig(k=k, num_latents=n), self.device, dtype=torch.float32)
        self.auxk_alpha = auxk_alpha
        self.threshold = 10_000_000  # TrainConfig.dead_feature_threshold
        self.counts = torch.zeros(n, dtype=torch.long, device=self.device)
        self.did_fire = torch.zeros(n, dtype=torch.bool, device=self.device)
        if optimizer == "signum":  # sparsify's default
            lr = 5e-3 / (n / 2**14) ** 0.5
            self.optimizer = ScheduleFreeWrapper(SignSGD([dict(params=self.sae.parameters(), lr=lr)]), momentum=0.95)
            self.optimizer.train()
            self.schedulers = []
        else:
            lr = 2e-4 / (n / 2**14) ** 0.5
            self.name = "sparsify-adam"
            self.optimizer = torch.optim.Adam([dict(params=self.sae.parameters(), lr=lr)])
            self.schedulers = [get_linear_schedule_with_warmup(self.optimizer, 1000, 10**9)]
        self.describe = f"{optimizer}, lr {lr:.3g}, auxk_alpha {auxk_alpha:g}"

    def setup(self, x):
        with torch.no_grad():  # what the trainer does at global step 0
            self.sae.b_dec.data = x.mean(0).to(self.sae.dtype)

    def set_dead(self, dead):
        self.counts.zero_()
        if dead is not None:
            self.counts[dead] = self.threshold + 1

    def step(self, x):
        sae = self.sae
        # The forward hook: (tokens, d) activations, excluded tokens masked out (none here).
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        _all_outputs = x.detach().clone()
        outputs, inputs = x[mask], x[mask]
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.counts > self.threshold if self.auxk_alpha > 0 else None
        total_variance = (outputs - outputs.mean(0)).pow(2).sum()
        out = sae(x=inputs, y=outputs, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        _avg_fvu = float(out.fvu.detach())
        if self.auxk_alpha > 0:
            _avg_auxk = float(out.auxk_loss.detach())
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(1).backward()
        # The optimisation step.
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for scheduler in self.schedulers:
            scheduler.step()
        with torch.no_grad():
            self.counts += int(mask.sum())
            self.counts[self.did_fire] = 0
            self.did_fire.zero_()

    @torch.no_grad()
    def reconstruct(self, x):
        swap = isinstance(self.optimizer, ScheduleFreeWrapper)
        if swap:  # schedule-free trains at y and evaluates at x: the trainer calls eval() before saving
            self.optimizer.eval()
        out = self.sae(x).sae_out
        if swap:
            self.optimizer.train()
        return out
