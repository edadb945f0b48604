"""Compile every Triton kernel of sae_sparse.triton ahead of time for Hopper (sm_90), at the
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
DIV16 = {"encode._encode_top_kernel": {"N", "S", "D", "L", "COL0"},
         "encode._encode_kernel": {"N", "S", "D", "CAP", "stride_w"},
         "encode._select_top_kernel": {"L", "NT", "D", "COL0"},
         "encode._settle_kernel": {"S", "D", "L", "NT", "COL0"},
         "edit_decode._edit_decode_kernel": {"K", "D", "H"},
         "backward._token_bwd_kernel": {"K", "D", "H"},
         "backward._dense_bwd_kernel": {"N", "D", "H", "N_PER"},
         "backward._latent_bwd_kernel": {"K", "D", "H", "S"},
         "fold._fold_kernel": {"S", "D", "S_PER"}, "fold._fold_t_kernel": {"S", "D"},
         "fold._fold_w_kernel": {"S", "D"}}
GEMM = dict(IEEE=False, BLOCK_N=128, BLOCK_S=128, BLOCK_D=64, NUM_PROGS=132)
# (candidates per row, k + 1, tiles) of the main encode path at shapes A, B, C, D
SELECT = [(1024, 33, 256), (3072, 33, 1024), (2048, 65, 512), (4096, 65, 1024)]


def cases():
    """(name, kernel "module.name", argument types (others i32), constexprs, compile options);
    constexprs (knobs, fixed) takes block sizes and warps from that tuning dict of
    sae_sparse.triton."""
    from sae_sparse.triton import ENCODE  # the launchers' knobs
    from sae_sparse.triton._common import p2  # the launchers' block-size rounding
    rlow = GEMM["BLOCK_S"] - 1 if ENCODE["key32"] else 0  # bf16 keys (as encode._rlow)
    out = []
    for dtype, rl in (("bf16", rlow), ("bf16", rlow ^ (GEMM["BLOCK_S"] - 1)), ("fp32", 0)):
        # bf16 with both epilogues (int32 keys and the argmax one; ENCODE["key32"] picks)
        for tma in (True, False) if dtype != "fp32" else (False,):  # as _gemm_args picks
            for thr in (False, True):
                desc = f"tensordesc<{dtype}[128,64]>" if tma else f"*{dtype}"
                out.append((f"encode_top-{dtype}-rlow{rl}-tma{int(tma)}-thr{int(thr)}",
                            "encode._encode_top_kernel",
                            dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", x_desc=desc,
                                 w_desc=desc, b_ptr=f"*{dtype}", thr_ptr=f"*{dtype}",
                                 cand_ptr="*i32" if rl else "*i64", act_ptr="*i32"),
                            dict(GEMM, TOPM=4, HAS_THR=thr, TMA=tma, IEEE=dtype == "fp32",
                                 RLOW=rl),
                            dict(num_warps=8, num_stages=3)))
    for sample in (True, False):
        bs = GEMM["BLOCK_S"] if sample else min(GEMM["BLOCK_S"], ENCODE["append_block_s"])
        out.append((f"encode_append-sample{int(sample)}", "encode._encode_kernel",
                    dict(x_ptr="*bf16", w_ptr="*bf16", x_desc="tensordesc<bf16[128,64]>",
                         w_desc=f"tensordesc<bf16[{bs},64]>", b_ptr="*bf16", thr_ptr="*bf16",
                         lo_ptr="*fp32", buf_ptr="*fp32" if sample else "*i64",
                         cnt_ptr="*i32", act_ptr="*i32"),
                    dict(GEMM, SAMPLE=sample, HAS_THR=True, TMA=True, WIDE=False, RLOW=rlow,
                         BLOCK_S=bs),
                    dict(num_warps=8, num_stages=3)))
    for shape, (L, kk, nt) in zip("ABCD", SELECT):
        block, KP = p2(L), p2(kk, 2)
        for by_tile in (True, False):  # ENCODE["select_by_tile"] (True at A-D) / False
            out.append((f"select_top-{shape}-by_tile{int(by_tile)}", "encode._select_top_kernel",
                        dict(cand_ptr="*i32" if rlow else "*i64", out_ptr="*i64",
                             bad_ptr="*i32", x_ptr="*bf16", fin_ptr="*i8"),
                        dict(BLOCK=block, KP=KP, TOPM=L // nt, BLOCK_T=p2(nt), BLOCK_S=128,
                             RLOW=rlow, BY_TILE=by_tile, CHECK_FIN=True, BLOCK_D=1024),
                        dict(num_warps=4 if block <= 2048 else 8)))
        for fix, finish, thr in ((1, True, False), (1, True, True), (1, False, False),
                                 (0, True, True), (2, True, False)):
            out.append((f"settle-{shape}-fix{fix}-finish{int(finish)}-thr{int(thr)}",
                        "encode._settle_kernel",
                        dict(keys_ptr="*i64", bad_ptr="*i32",
                             cand_ptr="*i32" if rlow else "*i64", fin_ptr="*i8", x_ptr="*bf16",
                             w_ptr="*bf16", b_ptr="*bf16", thr_ptr="*bf16", act_ptr="*i32",
                             val_ptr="*bf16", idx_ptr="*i64", id32_ptr="*i32", ovf_ptr="*i8"),
                        dict(FIX=fix, FINISH=finish, HAS_THR=thr, HAS_ID32=True, TOPM=L // nt,
                             KP=KP, BLOCK_T=p2(nt), BLOCK_S=128, TB=max(128, KP), BLOCK_D=32,
                             RLOW=rlow),
                        dict(num_warps=4)))
    out.append(("select_append", "encode._select_kernel",
                dict(buf_ptr="*i64", cnt_ptr="*i32", out_ptr="*i64", x_ptr="*bf16",
                     fin_ptr="*i8"), dict(BLOCK=2048, KP=128, BLOCK_D=1024),
                dict(num_warps=4)))
    # the fused edit + decode: plain decode (SAE step), delta with gain + bias + FFN (h = 16)
    for mode, gain, ffn, c in ((2, False, False, False), (0, True, True, True),
                               (1, True, False, True)):
        out.append((f"edit_decode-m{mode}-g{int(gain)}-f{int(ffn)}-c{int(c)}",
                    "edit_decode._edit_decode_kernel",
                    dict(y_ptr="*bf16", hpre_ptr="*fp32", x_ptr="*bf16", bdec_ptr="*bf16",
                         v_ptr="*bf16", idx_ptr="*i64", wdec_ptr="*bf16", gain_ptr="*fp32",
                         win_ptr="*fp32", bin_ptr="*fp32", f_ptr="*fp32"),
                    ("DECODE", dict(MODE=mode, ACT=1, HAS_GAIN=gain, HAS_FFN=ffn,
                                    HAS_BIN=ffn, HAS_C=c, HAS_BDEC=mode != 0, BLOCK_H=16)), None))
    # the per-token backward: edit step (x trains) and SAE step (encoder trains)
    for name, kw in (("edit", dict(MODE=0, HAS_GAIN=True, HAS_FFN=True, HAS_DVX=False,
                                   NEED_P=True, STORE_P=False, STORE_DPRE=False,
                                   STORE_GP=True, HAS_DX=True, DX_ID=True)),
                     ("sae", dict(MODE=2, HAS_GAIN=False, HAS_FFN=False, HAS_DVX=True,
                                  NEED_P=True, STORE_P=False, STORE_DPRE=True,
                                  STORE_GP=False, HAS_DX=False, DX_ID=False))):
        for kp in (32, 64):
            out.append((f"token_bwd-{name}-k{kp}", "backward._token_bwd_kernel",
                        dict(dy_ptr="*bf16", v_ptr="*bf16", idx_ptr="*i64", wdec_ptr="*bf16",
                             gain_ptr="*fp32", win_ptr="*fp32", hpre_ptr="*fp32",
                             f_ptr="*fp32", dvx_ptr="*bf16", wenc_ptr="*bf16",
                             dh_ptr="*fp32", dpre_ptr="*fp32", gp_ptr="*fp32", p_ptr="*fp32",
                             dx_ptr="*bf16"),
                        ("TOKEN", dict(kw, ACT=1, MASK_DPRE=True, KP=kp, BLOCK_H=16)), None))
    out.append(("dense_bwd", "backward._dense_bwd_kernel",
                dict(out_ptr="*fp32", hpre_ptr="*fp32", dh_ptr="*fp32", dy_ptr="*bf16"),
                ("DENSE", dict(ACT=1, HAS_C=True, BLOCK_R=32)), None))
    for name, kw in (("adapter", dict(G_GAIN=True, G_WIN=True, G_WENC=False, G_BENC=False,
                                      G_WDEC=False, HAS_SUB=False)),
                     ("sae", dict(G_GAIN=False, G_WIN=False, G_WENC=True, G_BENC=True,
                                  G_WDEC=True, HAS_SUB=True))):
        out.append((f"latent_bwd-{name}", "backward._latent_bwd_kernel",
                    dict(off_ptr="*i64", order_ptr="*i64", active_ptr="*i64", v_ptr="*bf16",
                         gp_ptr="*fp32", dh_ptr="*fp32", dpre_ptr="*fp32", x_ptr="*bf16",
                         sub_ptr="*bf16", dy_ptr="*bf16", gain_ptr="*fp32",
                         dgain_ptr="*fp32", dwin_ptr="*fp32", dwenc_ptr="*bf16",
                         dbenc_ptr="*bf16", dwdec_ptr="*bf16"),
                    ("SEGMENT", dict(kw, HAS_ACTIVE=False, DEC_MODE=2, HAS_GAIN=False,
                                     ADD_WDEC=False)), None))
    # the edit's folds: h = 16 plus the bias row (R = 17 -> 32 rows), bf16 (three-part
    # products) and fp32 W_dec
    for dtype, parts in (("bf16", 3), ("fp32", 1)):
        out.append((f"fold-{dtype}", "fold._fold_kernel",
                    dict(out_ptr="*fp32", wout_ptr="*fp32", bias_ptr="*fp32",
                         w_ptr=f"*{dtype}"),
                    ("FOLD", dict(BLOCK_R=32, HAS_BIAS=True, PARTS=parts,
                                  IEEE=dtype == "fp32")), None))
        out.append((f"fold_t-{dtype}", "fold._fold_t_kernel",
                    dict(out_ptr="*fp32", g_ptr="*fp32", w_ptr=f"*{dtype}"),
                    ("FOLD", dict(BLOCK_R=32, PARTS=parts, IEEE=dtype == "fp32")), None))
        out.append((f"fold_w-{dtype}", "fold._fold_w_kernel",
                    dict(out_ptr=f"*{dtype}", wout_ptr="*fp32", bias_ptr="*fp32",
                         g_ptr="*fp32"),
                    ("FOLD", dict(BLOCK_R=32, HAS_BIAS=True)), None))
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
        if knobs in ("TOKEN", "DENSE"):
            constexprs["BLOCK_D"] = tune["block_d"]
        if knobs == "DENSE":
            constexprs["BLOCK_N"] = tune["block_n"]
        if knobs == "DECODE":
            constexprs["BLOCK_K"] = tune["block_k"]
        options = dict(num_warps=tune["num_warps"])
        if knobs == "FOLD" and kernel.endswith("_fold_w_kernel"):  # as fold_w: a w_tile of dW
            constexprs.update(BLOCK_S=tune["w_tile"][0], BLOCK_D=tune["w_tile"][1])
        elif knobs == "FOLD":  # as fold / fold_t: n along D (forward) or latents (backward)
            fwd = kernel.endswith("._fold_kernel")
            constexprs.update(BLOCK_S=tune["block_k"] if fwd else tune["block_t"],
                              BLOCK_D=tune["block_n"] if fwd else tune["block_k"])
            options["num_stages"] = tune["num_stages"]
    mod, kname = kernel.split(".")
    import importlib
    fn = getattr(importlib.import_module(f"sae_sparse.triton.{mod}"), kname)
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
                if kname in ("_encode_top_kernel", "_encode_kernel"):
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
    import sae_sparse.triton as T
    import sae_sparse.triton.backward  # noqa: F401
    import sae_sparse.triton.encode  # noqa: F401
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
