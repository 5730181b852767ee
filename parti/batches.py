"""The order training reads data in: one seeded permutation per epoch, cut into per-rank batches.

A pure function of (seed, epoch), so a resumed run continues from the same batch of the same epoch and N
processes at batch B read the items one process reads at batch N x B.
"""

from __future__ import annotations

import torch

from parti.data import ignore_stop_signals
from parti.errors import PartiError


def epoch_batches(n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  flip_prob: float = 0.0) -> list[list]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches of
    batch_size * world, each rank taking its slice. Pure function of (seed, epoch): resumable.
    With flip_prob > 0 each entry is (index, flip) with flips drawn from the same generator."""
    per = batch_size * world
    if n < per:
        raise PartiError(f"the dataset has {n} items, fewer than one batch ({per}); lower --batch-size")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if flip_prob > 0:
        flips = (torch.rand(n, generator=g) < flip_prob).tolist()
        perm = list(zip(perm, flips))
    return [perm[i * per + rank * batch_size:i * per + (rank + 1) * batch_size] for i in range(n // per)]


def batch_stream(dataset, collate, *, batch_size: int, seed: int, epoch: int, start: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0, flip_prob: float = 0.0, pin_memory: bool = False):
    """Yield (epoch, index_in_epoch, batch) forever, starting at batch `start` of `epoch`.
    A batch is None when every item in it was unreadable (the caller skips it). `pin_memory` (for a GPU):
    batches in page-locked memory, so `.to(device, non_blocking=True)` does not wait for the device."""
    from torch.utils.data import DataLoader


    while True:
        batches = epoch_batches(len(dataset), batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world=world,
                                flip_prob=flip_prob)
        # A private generator: a DataLoader iterator draws its workers' base seed from the global RNG
        # otherwise, and a resumed run (a new iterator mid-epoch) would then shift the training RNG.
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(dataset, batch_sampler=batches[start:], collate_fn=collate, num_workers=num_workers,
                            generator=g, worker_init_fn=ignore_stop_signals, pin_memory=pin_memory)
        for i, batch in enumerate(loader, start=start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0
