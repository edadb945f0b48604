"""Where a process sits in a distributed ``train-sae`` run, and what it shares.

P = R × L processes (torchrun) form a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh`
``("replica", "shard")``: rank ``p`` is shard ``p % L`` of replica ``p // L``. The L ranks of
a replica each hold a slice of the dictionary (:class:`~sae_sparse.distributed.ShardedSAE`)
and its optimizer state; the R replicas train on disjoint rows of every batch and sum their
gradients. One process is the 1 × 1 mesh, with no collectives.

* **Activations**: every rank lists the same model batches (tokenising only); batch ``j`` is
  run by rank ``j mod P`` (the model forward is split P ways, without overlap) and one
  all-gather gives every rank the buffer a single process would have built, in the same
  order; each replica then takes its rows of each batch (:meth:`SAEMesh.rows`).
* **Checkpoints** (:func:`save_shards` / :class:`ShardReader`): each shard of replica 0 writes
  its rows (weights, Adam moments, per-latent counters) to its own safetensors file, then
  rank 0 writes ``manifest.json`` naming the files and their rows, atomically; a resume reads
  each rank's rows from whichever files hold them, so it may use another mesh.
"""
from __future__ import annotations

import json
import os

import torch


class SAEMesh:
    """This process's place in a ``(replica, shard)`` mesh of ``shard_latents`` shards per
    replica (see the module docstring); the one-process mesh without torch.distributed."""

    def __init__(self, shard_latents: int = 1, device=None):
        import torch.distributed as dist

        L = int(shard_latents)
        if L < 1:
            raise ValueError(f"shard_latents must be >= 1, got {shard_latents}")
        joined = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)
        if self.world % L:
            raise ValueError(
                f"shard_latents={L} must divide the number of processes ({self.world}): "
                + ("launch with torchrun --nproc_per_node P, P a multiple of it" if not joined
                   else f"P = replicas x {L}"))
        self.L, self.R = L, self.world // L
        self.replica, self.shard = divmod(self.rank, L)
        self.shard_group = self.replica_group = self.mesh = None
        if self.world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            kind = "cuda" if torch.device(device or "cpu").type == "cuda" else "cpu"
            self.mesh = init_device_mesh(kind, (self.R, L),
                                         mesh_dim_names=("replica", "shard"))
            self.shard_group = self.mesh.get_group("shard")
            self.replica_group = self.mesh.get_group("replica")

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs and writes the run's shared files."""
        return self.rank == 0

    @property
    def writes_shard(self) -> bool:
        """The ranks of replica 0, which write their shard's rows."""
        return self.replica == 0

    def __repr__(self):
        return (f"SAEMesh(rank={self.rank}, world={self.world}, replicas={self.R}, "
                f"shards={self.L})")

    # -- collectives (no-ops on one process) -------------------------------------------------

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self._comm_device())
        dist.broadcast(t, 0)
        return int(t)

    def sum_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of ``t`` over the replicas (the same shard of each)."""
        if self.R > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.replica_group)
        return t

    def _comm_device(self):
        import torch.distributed as dist

        return (torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl" else torch.device("cpu"))

    # -- the data ----------------------------------------------------------------------------

    def rows(self, n: int) -> tuple[int, int]:
        """This replica's rows [a, b) of a batch of ``n`` (sizes differ by at most one)."""
        from .distributed import shard_range

        return shard_range(n, self.replica, self.R)

    def run_split(self, stream, batches, on_batch=None) -> torch.Tensor:
        """The activations of ``batches`` (from ``stream.batches``), concatenated in their
        order on every rank; this rank runs batches ``rank, rank + P, ...`` and one all-gather
        shares them. ``on_batch(rows)`` is called after each batch this rank runs."""
        mine = []
        for j in range(self.rank, len(batches), self.world):
            mine.append(stream.run(batches[j]))
            if on_batch is not None:
                on_batch(mine[-1].shape[0])
        if self.world == 1:
            return torch.cat(mine)
        import torch.distributed as dist

        sizes = [sum(b.tokens for b in batches[r::self.world]) for r in range(self.world)]
        D = mine[0].shape[1] if mine else self._width(stream)
        dev = mine[0].device if mine else stream.device
        local = torch.cat(mine) if mine else torch.empty(0, D, device=dev)
        pad = max(sizes)
        local = torch.cat([local, local.new_zeros(pad - local.shape[0], D)])
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        out, at = [], [0] * self.world
        for j, b in enumerate(batches):
            r = j % self.world
            out.append(parts[r][at[r]:at[r] + b.tokens])
            at[r] += b.tokens
        return torch.cat(out)

    @staticmethod
    def _width(stream):
        """The hook's width (a rank with no batch of its own still gathers)."""
        from .hookpoints import hook_width

        return hook_width(stream.model, stream.path)


# -- checkpoints: each shard its own file, one manifest ------------------------------------


MANIFEST = "manifest.json"


def save_shards(ckpt_dir: str, mesh: SAEMesh, tag: str, rows: tuple[int, int],
                sliced: dict, whole: dict, manifest: dict) -> None:
    """Writes this shard's ``sliced`` tensors (rows ``rows`` of each per-latent tensor) and
    the replicated ``whole`` ones (every file holds them) as ``<tag>-<shard>of<L>``, then, on
    rank 0, ``manifest`` (plus the files and their rows) atomically, then removes the files
    of earlier checkpoints. Collective: every rank calls it."""
    from ._safetensors import write_safetensors

    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"{tag}-{mesh.shard:03d}of{mesh.L:03d}.safetensors"
    if mesh.writes_shard:
        tmp = os.path.join(ckpt_dir, name + ".tmp")
        write_safetensors(tmp, {**sliced, **{f"whole.{n}": t for n, t in whole.items()}})
        os.replace(tmp, os.path.join(ckpt_dir, name))
    span = torch.tensor(rows, dtype=torch.long)
    spans = _gather_spans(span, mesh)
    mesh.barrier()  # every shard's file is in place before the manifest names it
    if mesh.main:
        files = [{"file": f"{tag}-{s:03d}of{mesh.L:03d}.safetensors", "rows": r}
                 for s, r in enumerate(spans)]
        tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump({**manifest, "files": files}, f, indent=1)
        os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))
        keep = {f["file"] for f in files} | {MANIFEST}
        for old in os.listdir(ckpt_dir):
            if old not in keep and old.endswith(".safetensors"):
                os.remove(os.path.join(ckpt_dir, old))


def _gather_spans(span, mesh):
    """The row spans of replica 0's shards, in shard order, on rank 0."""
    if mesh.world == 1:
        return [span.tolist()]
    import torch.distributed as dist

    dev = mesh._comm_device()
    parts = [torch.empty(2, dtype=torch.long, device=dev) for _ in range(mesh.world)]
    dist.all_gather(parts, span.to(dev))
    return [parts[s].tolist() for s in range(mesh.L)]  # ranks 0..L-1: replica 0


class ShardReader:
    """A checkpoint written by :func:`save_shards`: ``manifest`` and the rows [s0, s1) of any
    per-latent tensor, read from whichever shard files hold them (safetensors slices, so a
    rank reads only its rows, whatever mesh wrote them)."""

    def __init__(self, ckpt_dir: str):
        with open(os.path.join(ckpt_dir, MANIFEST)) as f:
            self.manifest = json.load(f)
        self.dir = ckpt_dir

    def rows(self, name: str, s0: int, s1: int) -> torch.Tensor:
        from safetensors import safe_open

        parts = []
        for entry in self.manifest["files"]:
            a, b = entry["rows"]
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                with safe_open(os.path.join(self.dir, entry["file"]), "pt") as f:
                    parts.append(f.get_slice(name)[lo - a:hi - a])
        return torch.cat(parts)

    def whole(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(os.path.join(self.dir, self.manifest["files"][0]["file"]), "pt") as f:
            return f.get_tensor(f"whole.{name}")
