"""(token, latent) pairs sorted by latent: computed once per index tensor, shared by every backward.

A backward of the sparse ops needs, for each latent, the list of (token, j) pairs that use it
(segments). Sorting the B*k flat positions by latent once gives all segments at the same time, and
the same sort serves the decoder backward (dW_dec, d values) and the encoder backward (dW_enc,
db_enc) of one training step: a tiny cache keyed on the index tensor hands it to the second caller.

Binding SAEs index latent (slot, atom) as slot * n + atom. Sorting by the key atom * S + slot puts
all pairs of one atom next to each other (what the binding decoder backward wants: one program per
row of the shared dictionary) and, inside, the pairs of each latent (what the encoder wants).
"""
import torch


def sort_pairs(indices, n_atoms, n_slots=1):
    """order (P,), offsets (n_atoms * n_slots + 1,): flat positions of `indices` (B, k) sorted stably
    by key = atom * n_slots + slot; pairs with key q are order[offsets[q]:offsets[q + 1]]."""
    flat = indices.reshape(-1)
    key = flat if n_slots == 1 else flat.remainder(n_atoms) * n_slots + flat.div(n_atoms, rounding_mode="floor")
    if n_atoms * n_slots < 2**31:
        # 32-bit keys: half the bytes to sort, and on CPU not the OpenMP radix sort torch takes for
        # int64, whose barriers stall for milliseconds when the cores are shared (seen: 0.4 -> 300 ms).
        key = key.to(torch.int32)
    # Stable: inside a segment pairs stay in token order, so the segment sums are deterministic.
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(n_atoms * n_slots + 1, device=flat.device, dtype=key.dtype))
    return order, offsets


class _Cache:
    """The last few sorts, keyed on the index tensor's storage, version and shape.

    The entry keeps a reference to the index tensor, so its memory cannot be reused by another
    tensor while the entry lives: same pointer + same version means same contents."""

    def __init__(self, size=4):
        self.size = size
        self.entries = []  # (indices, version, n_atoms, n_slots, order, offsets)

    @staticmethod
    def _same(a, b):
        return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                and a.device == b.device and a.dtype == b.dtype)

    def get(self, indices, n_atoms, n_slots=1, any_slots=False):
        """Segments as (order, offsets, key_slots). With any_slots (the encoder, which only needs
        each latent's pairs contiguous), a sort keyed atom * S + slot with n_atoms * S latents is
        also returned; key_slots = S tells the caller how to translate keys to latents."""
        for ind, ver, na, ns, order, offsets in self.entries:
            if self._same(ind, indices) and ver == indices._version:
                if (na, ns) == (n_atoms, n_slots):
                    return order, offsets, ns
                if any_slots and n_slots == 1 and na * ns == n_atoms:
                    return order, offsets, ns
        order, offsets = sort_pairs(indices, n_atoms, n_slots)
        self.entries = [(indices, indices._version, n_atoms, n_slots, order, offsets)] + self.entries[: self.size - 1]
        return order, offsets, n_slots

    def clear(self):
        self.entries = []


CACHE = _Cache()
