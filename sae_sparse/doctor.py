"""``sae-sparse doctor`` (``python -m sae_sparse.doctor``): does this install compute the right
thing on this machine?

It prints the versions, the device and the backends, then runs each op -- ``topk_encode``,
``sparse_decode``, ``sae_forward``, ``sae_edit`` with a gain + bias + FFN adapter, and the AuxK
reconstruction ``auxk_decode`` -- on every backend this machine runs (and on the triton
backend through both of its paths, the fused kernels and the torch composition), forward and
backward, on fixed seeded cases (an odd fp32 shape, rows of exact ties, bf16; ``--quick``
keeps these three, the full run adds shapes that cross the GPU tiles), against the float64
reference. On a GPU it then times the fused path, the torch composition and the bare GEMM
at shapes A-D and names the path the op chooses. Exit status 1 on any mismatch.

On a CPU it checks ``torch`` and ``cpp``, and with ``--interpret`` also ``triton`` in the
Triton interpreter (which runs the GPU's launch settings; see sae_sparse/triton/_interpreter.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch

# max |got - want| / max |want| allowed per tensor, by the dtype the op ran in: a few units of
# the dtype's rounding (bf16 rounds its inputs, outputs and the backward's stored gradients)
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}

# The GPU shapes A-D (N, D, S, k), bf16, of the doctor, the benchmarks and the memory-plan
# tests: docs/benchmarks.md.
GPU_SHAPES = {"A": (8192, 768, 32768, 32), "B": (8192, 768, 131072, 32),
              "C": (8192, 2304, 65536, 64), "D": (4096, 4096, 131072, 64)}


@dataclasses.dataclass
class Case:
    name: str
    N: int
    D: int
    S: int
    k: int
    dtype: torch.dtype
    ties: bool = False  # duplicated encoder rows and an all-zero row: exact ties

    def tensors(self, device):
        """The case's SAE (b_pre, a JumpReLU-free TopK), adapter and x, seeded, on device."""
        from .modules import SAE, LatentAdapter

        g = torch.Generator().manual_seed(1000 + self.N + self.S)
        sae = SAE.random(self.D, self.S, self.k, b_pre=True, generator=g)
        with torch.no_grad():
            sae.W_enc.mul_(1 + 0.3 * torch.rand(self.S, 1, generator=g))
            sae.b_enc.copy_(0.05 * torch.randn(self.S, generator=g))
        x = torch.randn(self.N, self.D, generator=g)
        if self.ties:
            with torch.no_grad():
                sae.W_enc[[77, 150]] = sae.W_enc[3].clone()
                sae.b_enc[[3, 77, 150]] = 0.0
                sae.b_enc[self.S // 2:] = 0.0
            x[0] = 4 * sae.W_enc[3].detach() + sae.b_pre.detach()  # 3, 77, 150 tie on top
            x[1] = sae.b_pre.detach()  # pre = b_enc: half the latents tie at 0
        adapter = LatentAdapter(self.S, hidden=8, activation="gelu")
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        dead = torch.rand(self.S, generator=g) < 0.3
        return (sae.to(device, self.dtype), adapter.to(device), x.to(device, self.dtype),
                dead.to(device))


CASES = [Case("odd-fp32", 7, 33, 1000, 7, torch.float32),
         Case("ties-fp32", 5, 16, 200, 6, torch.float32, ties=True),
         Case("odd-bf16", 9, 48, 700, 8, torch.bfloat16)]
# the full run: shapes one past the GPU's 128-row and 128-latent tiles, 64-wide D steps
FULL_CASES = [Case("tiles-fp32", 129, 65, 2 * 128 + 1, 16, torch.float32),
              Case("tiles-bf16", 129, 65, 2 * 128 + 1, 16, torch.bfloat16),
              Case("ties-bf16", 5, 16, 200, 6, torch.bfloat16, ties=True)]


def _ops():
    """op name -> fn(sae, adapter, x, dead, backend) -> (outputs to compare, leaves whose
    gradients to compare). indices come first where an op selects latents."""
    from . import ops

    def encode(sae, adapter, x, dead, backend):
        v, i = ops.topk_encode(x, sae.W_enc, sae.b_enc, sae.k, b_pre=sae.b_pre,
                               backend=backend)
        return {"indices": i, "values": v}, {"values": v}

    def decode(sae, adapter, x, dead, backend):
        v, i = _fixed_code(sae, x)
        v = v.requires_grad_()
        y = ops.sparse_decode(v, i, sae.W_dec, sae.b_dec, backend=backend)
        return {"y": y}, {"y": y, "_values": v}

    def forward(sae, adapter, x, dead, backend):
        y, v, i = ops.sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k,
                                  b_pre=sae.b_pre, backend=backend)
        return {"indices": i, "values": v, "y": y}, {"y": y}

    def edit(sae, adapter, x, dead, backend):
        y = ops.sae_edit(x, sae, adapter, backend=backend)
        return {"y": y}, {"y": y}

    def auxk(sae, adapter, x, dead, backend):
        e = ops.auxk_decode(x, sae.W_enc, sae.b_enc, sae.W_dec, dead, 4, b_pre=sae.b_pre,
                            b_dec=sae.b_dec, backend=backend)
        return {"e_hat": e}, {"e_hat": e}

    return {"encode": encode, "decode": decode, "sae_forward": forward, "sae_edit": edit,
            "auxk": auxk}


OPS = ("encode", "decode", "sae_forward", "sae_edit", "auxk")


def _fixed_code(sae, x):
    """A code for the decode check that no backend chose: the float64 reference's."""
    from . import ops
    with torch.no_grad():
        v, i = ops.topk_encode(x.double(), sae.W_enc.double(), sae.b_enc.double(), sae.k,
                               b_pre=sae.b_pre.double(), backend="torch")
    return v.to(x.dtype), i


def _run(op, case, device, backend, path):
    """Outputs and gradients (of a fixed random functional of the outputs) of one op."""
    from .triton import paths

    sae, adapter, x, dead = case.tensors(device)
    if backend == "torch" and path == "float64":
        sae, adapter, x = sae.double(), adapter.double(), x.double()
    x.requires_grad_()
    with paths.forced(path if path in paths.PATHS else None):
        outs, for_grad = _ops()[op](sae, adapter, x, dead, backend)
    g = torch.Generator().manual_seed(7)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)
                .to(t.device)).sum() for n, t in sorted(for_grad.items()) if not n.startswith("_"))
    leaves = {"x": x, **{f"sae.{n}": p for n, p in sae.named_parameters()},
              **{f"adapter.{n}": p for n, p in adapter.named_parameters()}}
    leaves.update({n[1:]: t for n, t in for_grad.items() if n.startswith("_")})
    leaves = {n: t for n, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    outs.update({f"d {n}": (gr if gr is not None else torch.zeros_like(t))
                 for (n, t), gr in zip(leaves.items(), grads)})
    return {n: t.detach().cpu() for n, t in outs.items()}


def _compare(got, want, dtype):
    """(ok, worst relative error, sentence) of one run against the float64 reference."""
    tol = TOLERANCE[dtype]
    worst, why = 0.0, None
    for name, w in want.items():
        gt = got[name]
        if name == "indices":
            if not torch.equal(gt, w):
                n = int((gt != w).sum())
                return False, float("inf"), f"indices differ at {n} of {w.numel()} slots"
            continue
        if gt.shape != w.shape:
            return False, float("inf"), f"{name}: shape {tuple(gt.shape)} != {tuple(w.shape)}"
        g64, w64 = gt.double(), w.double()
        if not torch.equal(torch.isnan(g64), torch.isnan(w64)):
            return False, float("inf"), f"{name}: NaN where the reference has none"
        scale = w64.nan_to_num(0).abs().max().item() if w64.numel() else 0.0
        err = (g64 - w64).nan_to_num(0).abs().max().item() if w64.numel() else 0.0
        rel = err / scale if scale > 0 else err
        if rel > worst:
            worst = rel
        if rel > tol and why is None:
            why = f"{name}: max error {err:.3g} = {rel:.2g} of its largest entry (allowed {tol:g})"
    return why is None, worst, why or ""


def _targets(device):
    """(backend, path) pairs this machine runs for the tensors' device."""
    from . import backends

    avail = backends.available_backends()
    out = [("torch", None)]
    if device.type == "cpu" and "cpp" in avail:
        out.append(("cpp", None))
    if "triton" in avail and backends._supports("triton", device):
        out += [("triton", "fused"), ("triton", "torch")]
    return out


def check(device, cases, log=print, ops=None):
    """Every op (or those named in ops) on every (backend, path) against the float64
    reference -> list of rows."""
    rows = []
    for case in cases:
        for op in ops or _ops():
            want = _run(op, case, device, "torch", "float64")
            for backend, path in _targets(device):
                t0 = time.perf_counter()
                try:
                    got = _run(op, case, device, backend, path)
                    ok, err, why = _compare(got, want, case.dtype)
                except Exception as e:  # a crash is a failed check, reported, not raised
                    ok, err, why = False, float("inf"), f"{type(e).__name__}: {e}"
                row = dict(op=op, backend=backend, path=path or "-", case=case.name,
                           dtype=str(case.dtype).replace("torch.", ""), ok=ok,
                           max_rel_error=err, seconds=round(time.perf_counter() - t0, 3),
                           problem=why)
                rows.append(row)
                log(f"  {'ok  ' if ok else 'FAIL'} {op:<12}{backend:<7}{row['path']:<6} "
                    f"{case.name:<11} max rel err {err:.1e}" + (f"  {why}" if why else ""))
    return rows


def timings(device, shapes=GPU_SHAPES, log=print):
    """On a GPU: ms (median) of the encode on the fused path and the torch composition, the
    bare bf16 GEMM x W_enc^T, and the path the op chooses, at shapes A-D."""
    rows = []
    for name, (N, D, S, k) in shapes.items():
        row = dict(shape=name, N=N, D=D, S=S, k=k, **_time_encode(device, N, D, S, k))
        rows.append(row)
        log(f"  {name}: N={N} D={D} S={S} k={k}  fused {row['fused_ms']:.3f} ms  torch "
            f"{row['torch_ms']:.3f} ms  GEMM {row['gemm_ms']:.3f} ms  -> {row['chosen']}")
    return rows


def _time_encode(device, N, D, S, k):
    """One shape's timings (random bf16 x and W_enc, zero b_enc) and the chosen path."""
    import triton.testing

    from . import ops
    from .triton import paths

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, D, device=device, generator=g, dtype=torch.bfloat16)
    W = torch.randn(S, D, device=device, generator=g, dtype=torch.bfloat16) / D ** 0.5
    b = torch.zeros(S, device=device, dtype=torch.bfloat16)

    def bench(f):
        return triton.testing.do_bench(f, warmup=5, rep=50, return_mode="median")
    ms = {f"{p}_ms": bench(lambda p=p: ops.topk_encode(x, W, b, k, backend="triton", path=p))
          for p in paths.PATHS}
    ms["gemm_ms"] = bench(lambda: x @ W.T)
    paths.clear()
    ops.topk_encode(x, W, b, k, backend="triton")  # timed and checked, as a user's first call
    chosen = paths._CACHE.get(paths.bucket("encode", x, W, None, None, k=k, id32=False))
    return dict(ms, chosen=chosen, refused=[str(v) for v in paths.refused().values()])


def environment():
    from . import __version__, backends
    from .triton import _common, _interpreter

    env = dict(sae_sparse=__version__, python=platform.python_version(),
               torch=torch.__version__, triton=None, platform=platform.platform(),
               device="cpu", backends=backends.backend_status(),
               interpreter=_common.interpreting())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2 ** 30:.0f} GiB; CUDA {torch.version.cuda})")
    elif env["interpreter"]:
        env["device"] = (f"cpu (triton kernels in the interpreter as on "
                         f"{_interpreter.interpreter_sms()} SMs)")
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sae-sparse doctor",
                                 description="Check that this install computes the right thing "
                                 "on this machine: every op on every backend and path, forward "
                                 "and backward, against the float64 reference; on a GPU also "
                                 "encode timings at shapes A-D. Exit status 1 on a mismatch.")
    ap.add_argument("--quick", action="store_true",
                    help="the three small cases only, no timings (under a minute on a CPU)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--save", metavar="FILE", default=None,
                    help="also write that JSON object to FILE")
    ap.add_argument("--interpret", action="store_true",
                    help="on a CPU, also check the triton kernels in the Triton interpreter")
    ap.add_argument("--device", default=None, help="cuda or cpu [default: cuda if available]")
    ap.add_argument("--op", action="append", choices=list(OPS), default=None,
                    help="check only this op; repeatable [default: all]")
    a = ap.parse_args(argv)
    if a.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter must be chosen before triton is imported: run again with it
        env = dict(os.environ, TRITON_INTERPRET="1")
        args = [sys.executable, "-m", "sae_sparse.doctor", *(argv if argv is not None
                                                               else sys.argv[1:])]
        return subprocess.run(args, env=env).returncode
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = (lambda *_: None) if a.json else print
    env = environment()
    log(f"sae_sparse {env['sae_sparse']}  torch {env['torch']}  triton {env['triton']}  "
        f"python {env['python']}")
    log(f"device: {env['device'] if device.type == 'cuda' else 'cpu'}")
    for name, status in env["backends"].items():
        log(f"backend {name}: {status}")
    log("checks against the float64 reference (forward and backward):")
    rows = check(device, CASES if a.quick else CASES + FULL_CASES, log, ops=a.op)
    times = []
    if device.type == "cuda" and not a.quick:
        log("encode timings, bf16 (median ms):")
        times = timings(device, log=log)
    failed = [r for r in rows if not r["ok"]]
    log(f"{len(rows) - len(failed)} of {len(rows)} checks passed"
        + (": this install can be trusted on this device." if not failed else
           "; please report the FAIL lines with this output."))
    result = json.dumps(dict(environment=env, checks=rows, timings=times, ok=not failed),
                        default=str)
    if a.json:
        print(result)
    if a.save:
        with open(a.save, "w") as f:
            f.write(result + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
