"""Data-parallel helpers over torch.distributed: the rank and world, each rank's share of
a batch, barriers, all-reduces and the gradient sum of a step.
"""
from __future__ import annotations

import torch


def rank_world():
    """(rank, world size, process group or None): torch.distributed when initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    return 0, 1, None


def share(items, rank, world):
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def barrier(group):
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group)


def all_reduce(t, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def sync_grads(params, stop: bool, group, device) -> bool:
    """Sums the ranks' gradients (each rank's loss is its share of the global batch's mean,
    so the sum is the 1-process gradient) in one all-reduce, with each rank's Ctrl-C flag;
    no host sync."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float().to(device) for g in grads] +
                     [torch.tensor([float(stop)], device=device)])
    all_reduce(flat, group)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).to(g.device, g.dtype)
        off += n
    return flat[-1]  # > 0 when any rank was interrupted (read back later, with the loss)
