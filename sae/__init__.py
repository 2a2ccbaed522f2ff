"""Sparse autoencoders trained on cached residual activations: standard and matrix-binding.

    import sae
    m = sae.TopKSAE(d_in=64, n_latents=1024, k=8)
    m = sae.BindingSAE(d_in=64, n_latents=256, n_slots=2, k=8)   # decoder [D; M_2 D]
    m = sae.BindingSAE(64, 256, n_slots=2, sparsity=sae.BatchTopK(k=8))  # any sparsity rule
    m = sae.SkipTranscoder(64, 1024, d_out=64, sparsity=sae.TopK(k=8))   # one hook -> another
    out = m(x)                      # out.x_hat, out.codes, out.loss, out.losses
    sae.train(m, data, steps=1000, batch_size=1024, lr=1e-3, seed=0)
    m.save("dir"); m2 = sae.load("dir")

The package is a stack that imports only downward (tests/test_layers.py holds it to that):
    sae.core      configs, files, architectures, kernels, io, store, metrics, the plain training loop
    sae.lm        language models with their hook names, the cache writer, splicing, MiniLM
    sae.recipes   ways to train: `train` picks the plain loop or the binding recipe
    sae.eval      evaluation scripts and experiments
This module is the public face: it re-exports the library's names from core and recipes.
"""
from sae.core.architectures.base import SAE, Code, SAEConfig, SAEOutput
from sae.core.architectures.batchtopk import BatchTopK, BatchTopKSAE
from sae.core.architectures.binding import BindingSAE
from sae.core.architectures.jumprelu import JumpReLU, JumpReLUSAE
from sae.core.architectures.matryoshka import MatryoshkaSAE
from sae.core.architectures.relu import ReLU, ReLUSAE
from sae.core.architectures.sparsity import Sparsity
from sae.core.architectures.topk import TopK, TopKPerSlot, TopKSAE
from sae.core.architectures.transcoder import SkipTranscoder, Transcoder
from sae.core.io import load, save
from sae.core.trainer import TrainConfig, TrainResult
from sae.recipes.training import train, train_many

__all__ = ["SAE", "SAEConfig", "SAEOutput", "Code", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "BindingSAE",
           "MatryoshkaSAE", "Transcoder", "SkipTranscoder", "Sparsity", "TopK", "TopKPerSlot", "BatchTopK", "ReLU",
           "JumpReLU",
           "load", "save", "train", "train_many", "TrainConfig", "TrainResult"]
