import os

# Both must be set before anything imports triton or wandb.
os.environ.setdefault("WANDB_MODE", "disabled")
# Test-sized ops gain nothing from intra-op threads and stall badly when the other core is busy;
# the variable also reaches the subprocesses tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if not torch.cuda.is_available():
        # Triton kernels run on CPU tensors in the interpreter (see kernels.md for its traps).
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
