"""Compile every Triton kernel of sae_sparse._triton ahead of time for Hopper (sm_90), at the
configurations its launchers pick on a GPU (shapes A-D of the GPU issue); no GPU needed.

    python tests/hopper_compile.py      # prints one JSON line per case

Must run in a process where triton was imported *without* TRITON_INTERPRET=1 (the
interpreter turns triton's own standard library into interpreted functions, which the
compiler cannot inline); tests/test_triton_compile.py runs it in a subprocess.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Per kernel, the integer arguments that are multiples of 16 at shapes A-D, so a launch there
# specializes them as such (as it does every 16-byte-aligned pointer): the compiler then
# vectorizes loads along them (e.g. the decode's row gathers: 2-byte loads without it).
DIV16 = {"_encode_top_kernel": {"N", "S", "D", "L", "COL0"},
         "_encode_kernel": {"N", "S", "D", "CAP", "stride_w"},
         "_select_top_kernel": {"L", "NT", "COL0"},
         "_fixup_kernel": {"S", "D", "L", "NT", "COL0"},
         "_edit_decode_kernel": {"K", "C", "H"}, "_gather_dot_kernel": {"K", "C"},
         "_segment_rows_kernel": {"K", "C", "S"},
         "_fold_kernel": {"S", "D", "S_PER"}, "_fold_t_kernel": {"S", "D"},
         "_fold_w_kernel": {"S", "D"}, "_finite_rows_kernel": {"D"}}
GEMM = dict(IEEE=False, UPCAST=False, BLOCK_N=128, BLOCK_S=128, BLOCK_D=64, NUM_PROGS=132)
# (candidates per row, k + 1, tiles) of the main encode path at shapes A, B, C, D
SELECT = [(1024, 33, 256), (3072, 33, 1024), (2048, 65, 512), (4096, 65, 1024)]


def cases():
    """(name, kernel, argument types (others i32), constexprs, compile options); constexprs
    (knobs, fixed) takes block sizes and warps from that tuning dict of sae_sparse._triton."""
    from sae_sparse._triton import ENCODE, _p2  # the launchers' block-size rounding
    rlow = GEMM["BLOCK_S"] - 1 if ENCODE["key32"] else 0  # bf16 keys (as _triton._rlow)
    out = []
    for dtype, rl in (("bf16", rlow), ("bf16", rlow ^ (GEMM["BLOCK_S"] - 1)), ("fp32", 0)):
        # bf16 with both epilogues (int32 keys and the argmax one; ENCODE["key32"] picks)
        for tma in (True, False) if dtype != "fp32" else (False,):  # as _gemm_args picks
            for thr in (False, True):
                desc = f"tensordesc<{dtype}[128,64]>" if tma else f"*{dtype}"
                out.append((f"encode_top-{dtype}-rlow{rl}-tma{int(tma)}-thr{int(thr)}",
                            "_encode_top_kernel",
                            dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", x_desc=desc,
                                 w_desc=desc, b_ptr=f"*{dtype}", thr_ptr=f"*{dtype}",
                                 cand_ptr="*i32" if rl else "*i64", act_ptr="*i32"),
                            dict(GEMM, TOPM=4, HAS_THR=thr, TMA=tma, IEEE=dtype == "fp32",
                                 RLOW=rl),
                            dict(num_warps=8, num_stages=3)))
    for sample in (True, False):
        bs = GEMM["BLOCK_S"] if sample else min(GEMM["BLOCK_S"], ENCODE["append_block_s"])
        out.append((f"encode_append-sample{int(sample)}", "_encode_kernel",
                    dict(x_ptr="*bf16", w_ptr="*bf16", x_desc="tensordesc<bf16[128,64]>",
                         w_desc=f"tensordesc<bf16[{bs},64]>", b_ptr="*bf16", thr_ptr="*bf16",
                         lo_ptr="*fp32", buf_ptr="*fp32" if sample else "*i64",
                         cnt_ptr="*i32", act_ptr="*i32"),
                    dict(GEMM, SAMPLE=sample, HAS_THR=True, TMA=True, WIDE=False, RLOW=rlow,
                         BLOCK_S=bs),
                    dict(num_warps=8, num_stages=3)))
    for shape, (L, kk, nt) in zip("ABCD", SELECT):
        block, KP = _p2(L), _p2(kk, 2)
        for by_tile in (True, False):  # ENCODE["select_by_tile"] (True at A-D) / False
            out.append((f"select_top-{shape}-by_tile{int(by_tile)}", "_select_top_kernel",
                        dict(cand_ptr="*i32" if rlow else "*i64", out_ptr="*i64",
                             bad_ptr="*i32", list_ptr="*i32", nlist_ptr="*i32"),
                        dict(BLOCK=block, KP=KP, TOPM=L // nt, BLOCK_T=_p2(nt), BLOCK_S=128,
                             RLOW=rlow, BY_TILE=by_tile),
                        dict(num_warps=4 if block <= 2048 else 8)))
        out.append((f"fixup-{shape}", "_fixup_kernel",
                    dict(list_ptr="*i32", nlist_ptr="*i32", keys_ptr="*i64", bad_ptr="*i32",
                         cand_ptr="*i32" if rlow else "*i64", fin_ptr="*i8", x_ptr="*bf16",
                         w_ptr="*bf16", b_ptr="*bf16"),
                    dict(TOPM=L // nt, KP=KP, BLOCK_T=_p2(nt), BLOCK_S=128, TB=max(128, KP),
                         BLOCK_D=32, RLOW=rlow),
                    dict(num_warps=4)))
        for has_bad, thr in ((True, False), (False, True)):
            out.append((f"finish-{shape}-bad{int(has_bad)}-thr{int(thr)}", "_finish_kernel",
                        dict(keys_ptr="*i64", bad_ptr="*i32", fin_ptr="*i8", thr_ptr="*bf16",
                             act_ptr="*i32", val_ptr="*fp32", idx_ptr="*i64", ovf_ptr="*i8",
                             left_ptr="*i8"),
                        dict(HAS_BAD=has_bad, HAS_THR=thr, KP=KP), dict(num_warps=4)))
    for dtype in ("bf16", "fp32"):
        out.append((f"finite_rows-{dtype}", "_finite_rows_kernel",
                    dict(x_ptr=f"*{dtype}", fin_ptr="*i8"), dict(BLOCK_D=1024),
                    dict(num_warps=4)))
    out.append(("select_append", "_select_kernel",
                dict(buf_ptr="*i64", cnt_ptr="*i32", out_ptr="*i64"), dict(BLOCK=2048, KP=128),
                dict(num_warps=4)))
    for has in ((True, True, True, True), (False, False, True, False),
                (False, True, True, False)):
        out.append(("edit_decode-" + "".join(str(int(h)) for h in has), "_edit_decode_kernel",
                    dict(out_ptr="*bf16", x_ptr="*bf16", base_ptr="*fp32", coef_ptr="*fp32",
                         idx_ptr="*i64", w_ptr="*bf16", a_ptr="*fp32", m_ptr="*fp32"),
                    ("DECODE", dict(zip(("HAS_X", "HAS_BASE", "HAS_COEF", "HAS_H"), has),
                                    BLOCK_H=16)),
                    None))
    out.append(("gather_dot", "_gather_dot_kernel",
                dict(out_ptr="*fp32", a_ptr="*bf16", idx_ptr="*i64", w_ptr="*bf16"),
                ("GATHER_DOT", dict(BLOCK_K=64)), None))
    for sub in (True, False):
        out.append((f"segment_rows-sub{int(sub)}", "_segment_rows_kernel",
                    dict(out_ptr="*bf16", csum_ptr="*fp32", off_ptr="*i64", order_ptr="*i64",
                         active_ptr="*i64", coef_ptr="*bf16", src_ptr="*bf16",
                         sub_ptr="*bf16"),
                    ("SEGMENT", dict(HAS_SUB=sub)), None))
    # the edit's folds: h = 16 plus the bias row (R = 17), and R > 32 (64 rows; fp32: 32)
    for dtype, br in (("bf16", 32), ("bf16", 64), ("fp32", 32)):
        fb = ("FOLD", dict(BLOCK_R=br))
        out.append((f"fold-{dtype}-r{br}", "_fold_kernel",
                    dict(out_ptr="*fp32", a_ptr=f"*{dtype}", w_ptr=f"*{dtype}"),
                    (fb[0], dict(fb[1], IEEE=dtype == "fp32", UPCAST=False)), None))
        out.append((f"fold_t-{dtype}-r{br}", "_fold_t_kernel",
                    dict(out_ptr="*fp32", g_ptr=f"*{dtype}", w_ptr=f"*{dtype}"),
                    (fb[0], dict(fb[1], P=1 if dtype == "fp32" else 3, IEEE=dtype == "fp32",
                                 UPCAST=False)), None))
    for dtype, parts, br in (("bf16", 3, 32), ("fp16", 2, 32), ("bf16", 3, 64), ("fp32", 1, 32)):
        out.append((f"fold_w-{dtype}-r{br}", "_fold_w_kernel",
                    dict(out_ptr=f"*{dtype}", a_ptr=f"*{dtype}", g_ptr=f"*{dtype}",
                         scale_ptr="*fp32"),
                    ("FOLD", dict(BLOCK_R=br, P=parts, HAS_SCALE=dtype == "fp16",
                                  IEEE=dtype == "fp32", UPCAST=False)), None))
    return out


def compile_case(T, case):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    name, kernel, types, constexprs, options = case
    if isinstance(constexprs, tuple):  # the launcher's tunables, read from the module
        knobs, constexprs = constexprs[0], dict(constexprs[1])
        tune = getattr(T, knobs)
        if "block_c" in tune:
            constexprs["BLOCK_C"] = tune["block_c"]
        if knobs == "SEGMENT":
            constexprs["BLOCK_E"] = tune["block_e"]
        if knobs == "DECODE":
            constexprs["BLOCK_K"] = tune["block_k"]
        options = dict(num_warps=tune["num_warps"])
        if knobs == "FOLD" and kernel == "_fold_w_kernel":  # as fold_w: a w_tile of dW
            constexprs.update(BLOCK_S=tune["w_tile"][0], BLOCK_D=tune["w_tile"][1])
        elif knobs == "FOLD":  # as fold / fold_t: n along D (forward) or latents (backward)
            fwd = kernel == "_fold_kernel"
            constexprs.update(BLOCK_S=tune["block_k"] if fwd else tune["block_n"],
                              BLOCK_D=tune["block_n"] if fwd else tune["block_k"])
            options["num_stages"] = tune["num_stages"]
    fn = getattr(T, kernel)
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in DIV16.get(kernel, ())}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # reported, not raised: every case gets a verdict
        return dict(name=name, ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        ptxas = get_ptxas(90).path
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin],
                           capture_output=True, text=True)
        epi = total = None
        if r.returncode == 0:
            nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
            if sass.returncode == 0:
                total = len(re.findall(r"^\s+/\*[0-9a-f]+\*/", sass.stdout, re.M))
                if kernel in ("_encode_top_kernel", "_encode_kernel"):
                    epi = epilogue_instructions(sass.stdout)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    return dict(name=name, ok=r.returncode == 0, error=r.stderr[-3000:],
                regs=int(regs.group(1)) if regs else None,
                spill_bytes=sum(int(b) for b in re.findall(r"(\d+) bytes spill", r.stderr)),
                shared=k.metadata.shared, sass_instructions=total,
                epilogue_instructions=epi)


def epilogue_instructions(sass: str):
    """Static SASS instructions of a persistent GEMM kernel's tile epilogue: from the branch
    after the last tensor-core instruction that skips it (K steps left) to that branch's label.
    Straight-line code run once per tile by every thread, so per tile it costs about
    (count x warps / 4 schedulers) issue cycles next to the tile's MMA time. Info, not a gate."""
    lines = sass.splitlines()
    mma = [i for i, line in enumerate(lines) if "HGMMA" in line or "HMMA" in line]
    if not mma:
        return None
    for i in range(mma[-1], len(lines)):
        m = re.search(r"@!?P\d BRA `\((\.L_x_\d+)\)", lines[i])
        if m:
            end = next((j for j in range(i, len(lines)) if lines[j].startswith(m.group(1) + ":")),
                       None)
            if end is None:
                return None
            return sum(1 for line in lines[i + 1:end] if re.match(r"\s+/\*[0-9a-f]+\*/", line))
    return None


def _run(i):
    from sae_sparse import _triton as T
    return compile_case(T, cases()[i])


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1")
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for res in pool.map(_run, range(len(cases()))):
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
