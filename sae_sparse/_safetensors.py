"""Writing safetensors files without a second copy of the tensors in memory.

``safetensors.torch.save_file`` turns every tensor into a Python ``bytes`` object before it
writes, so saving a dictionary of 2^20 latents (and its Adam moments) needs their size again
in free memory. Here the header is built from the shapes and each tensor's bytes are written
from its own storage (``W_enc`` stored transposed, as SAELens does, a block of columns at a
time). The files are ordinary safetensors files (read back with ``safe_open`` / ``load_file``).
"""
from __future__ import annotations

import json

import torch

_BLOCK_BYTES = 1 << 26  # a transposed tensor is written in blocks of columns this large

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
          torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.uint8: "U8", torch.bool: "BOOL"}


class Transposed:
    """``t.T`` for :func:`write_safetensors`, written a block of columns of ``t`` at a time
    instead of materialised."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def shape(self):
        return list(self.t.shape[::-1])

    @property
    def dtype(self):
        return self.t.dtype


def header(specs: dict, metadata: dict | None = None) -> tuple[bytes, dict]:
    """The safetensors header for ``{name: (dtype, shape)}`` (in that order in the file):
    (the 8-byte length + the JSON, padded so the data starts 8-byte aligned; the entries with
    their ``data_offsets``)."""
    entries, at = {}, 0
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPES:
            raise ValueError(f"{name}: safetensors has no {dtype}")
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    meta = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    head = json.dumps({**meta, **entries}, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return len(head).to_bytes(8, "little") + head, entries


def _raw(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Writes ``{name: tensor or Transposed(tensor)}`` to ``path`` (CPU tensors are written
    from their storage; others are moved a tensor at a time)."""
    head, _ = header({n: (t.dtype, t.shape) for n, t in tensors.items()}, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            if isinstance(t, Transposed):
                src = t.t.detach()
                cols = max(1, _BLOCK_BYTES // max(1, src.shape[0] * src.element_size()))
                for c in range(0, src.shape[1], cols):  # rows of t.T = columns of t
                    f.write(_raw(src[:, c:c + cols].T.contiguous().cpu()))
            else:
                f.write(_raw(t.detach().cpu().contiguous()))
