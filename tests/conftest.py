import os

# Both must be set before anything imports triton or wandb.
os.environ.setdefault("WANDB_MODE", "disabled")
try:
    import torch

    if not torch.cuda.is_available():
        # Triton kernels run on CPU tensors in the interpreter (see kernels.md for its traps).
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
