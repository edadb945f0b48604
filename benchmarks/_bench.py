"""What the benchmark scripts share: writing a results file and timing a sparsify step (CPU
and GPU scripts); for the GPU scripts, shapes A-D of the GPU issue, timing and peak memory,
and a --smoke mode that runs a script end to end on tiny shapes on CPU under the Triton
interpreter (TRITON_INTERPRET=1), so a broken script shows up in CI, not on a GPU lease."""
import os
import time

import torch

from sae_sparse.doctor import GPU_SHAPES

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def write_result(text: str, name: str, path=None) -> str:
    """Writes a benchmark's table to `path` (default benchmarks/results/<name>), says where."""
    path = path or os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {path}")
    return path


def sparsify_step(sae, x, dead_mask=None):
    """A closure for timing one training step of an EleutherAI sparsify SparseCoder as its
    Trainer takes it (fvu + auxk_alpha * auxk_loss with auxk_alpha = 1/32, backward), the
    gradients cleared after."""
    def run():
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.zero_grad(set_to_none=True)
    return run


SHAPES = GPU_SHAPES  # (N, D, S, k), defined once in sae_sparse.doctor
SMOKE_SHAPES = {"A": (24, 32, 600, 4), "B": (20, 24, 1100, 5)}


class Bench:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.shapes = SMOKE_SHAPES if smoke else SHAPES

    def card(self) -> str:
        return "CPU smoke run (Triton interpreter)" if self.smoke else torch.cuda.get_device_name()

    def banner(self) -> str:
        import triton
        return f"{self.card()} torch {torch.__version__} triton {triton.__version__}"

    def each_shape(self, names: str):
        """(name, N, D, S, k, generator seeded 0 on the device) for each known shape in the
        comma-separated `names` (unknown names, e.g. C in smoke runs, are skipped)."""
        for name in names.split(","):
            if name in self.shapes:
                g = torch.Generator(device=self.device).manual_seed(0)
                yield (name, *self.shapes[name], g)

    def ms(self, fn, quantiles=None):
        """Median ms (do_bench; with quantiles, (median, q20, q80)); one timed call in smoke."""
        if self.smoke:
            t0 = time.perf_counter()
            fn()
            t = (time.perf_counter() - t0) * 1e3
            return (t, t, t) if quantiles else t
        import triton
        if quantiles:
            return tuple(triton.testing.do_bench(fn, quantiles=quantiles))
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak_extra(self, fn) -> float:
        """MiB allocated at peak beyond what was allocated before fn (nan in smoke)."""
        if self.smoke:
            fn()
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    def sweep(self, rows, shape, what, knobs, grid, measure):
        """For each config of `grid` (updates to the tuning dict `knobs`): append the row
        (shape, "<what> <config>", *measure()) -- measure returns (ms, figure, note); an error
        becomes a row of nan in a GPU run and is raised in smoke. `knobs` is restored after."""
        default = dict(knobs)
        try:
            for cfg in grid:
                knobs.clear()
                knobs.update(default, **cfg)
                label = f"{what} " + (",".join(f"{k}={v}" for k, v in cfg.items()) or "default")
                try:
                    rows.append((shape, label, *measure()))
                except Exception as e:  # report and go on
                    if self.smoke:
                        raise
                    rows.append((shape, label, float("nan"), float("nan"),
                                 f"{type(e).__name__}: {str(e)[:80]}"))
                print(*rows[-1], flush=True)
        finally:
            knobs.clear()
            knobs.update(default)


def table(rows, figure: str):
    """The rows as a markdown table: shape, what, median ms, `figure`, note."""
    print(f"\n| shape | what | median ms | {figure} | note |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2f} | {r[4]} |")
