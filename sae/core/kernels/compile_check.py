"""Compile every Triton kernel for an H100 (sm_90) without a GPU, and report registers and spills.

    python -m sae.core.kernels.compile_check            # all kernels at the benchmark's sizes
    python -m sae.core.kernels.compile_check --quick    # one configuration per kernel

The interpreter runs kernels as NumPy and so never meets the GPU compiler: a kernel can pass every
interpreter test and still fail to compile (a global that is not a constexpr, an unsupported type
mix), or compile into register spills. Triton ships ptxas/cuobjdump, so the full pipeline runs here
on CPU. Launch configurations come from the same functions the launchers use; pointer and size
arguments get the divisibility-by-16 hints Triton gives them at launch for the benchmark's shapes.
Exit status 1 if a kernel fails to compile (spills are reported, not fatal).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check needs the real compiler: run it without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sae.core.kernels import triton_decode as dec  # noqa: E402
from sae.core.kernels import triton_encode as enc  # noqa: E402

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(fn, pointer_types, constexprs, div16=(), num_warps=4, num_stages=3, arch=90):
    """Compile `fn` for sm_<arch>; returns dict(regs, spill_bytes, smem, wgmma)."""
    sig = {n: ("constexpr" if n in constexprs else pointer_types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return dict(regs=int(regs.group(1)) if regs else -1, spill_bytes=int(stack.group(1)) if stack else -1,
                smem=compiled.metadata.shared, wgmma=compiled.asm["ptx"].count("wgmma.mma_async"))


def configurations(quick=False):
    """(name, fn, pointer types, constexprs, div16 args, warps, stages) at the benchmark's shapes."""
    ks = [32] if quick else [32, 64, 128, 256, 512]  # 4k caps of BatchTopK reach 512
    ds = [768] if quick else [768, 2048, 4096]
    # (storage dtype, dot): bf16 weights; fp32 weights under bf16 autocast (cast in-kernel); fp32 tf32.
    dtypes = [("bf16", 2)] if quick else [("bf16", 2), ("fp32", 2), ("fp32", 1)]
    out = []
    for dt, dot in dtypes:
        for K in ks:
            BM, BN, BK, warps, stages = enc.encode_blocks(K, 2 if dt == "bf16" else 4)
            for final in ([False] if quick else [False, True]):
                ptrs = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", benc_ptr=f"*{dt}", bdec_ptr=f"*{dt}",
                            keys_ptr="*i64", vals_ptr=f"*{dt}", idx_ptr="*i64")
                const = dict(stride_xd=1, stride_wn=1, K=K, BM=BM, BN=BN, BK=BK, HAS_BDEC=True,
                             DOT=dot, FINAL=final, INTERP=False)
                div = ("D", "stride_xb", "stride_wd", "stride_kb", "stride_kc", "stride_vb", "stride_ib",
                       "N_GROUP", "CHUNK")
                out.append((f"encode {dt} dot={dot} K={K} final={final}", enc._encode_kernel, ptrs, const, div, warps, stages))
            BMm, warps = enc.merge_blocks(K)
            out.append((f"merge K={K}", enc._merge_kernel, dict(keys_ptr="*i64", vals_ptr=f"*{dt}", idx_ptr="*i64"),
                        dict(K=K, BM=BMm, INTERP=False), ("stride_kb", "stride_vb", "stride_ib"), warps, 1))
    for d in ds:
        for K in ([32] if quick else [32, 128, 512]):
            BJ, BD, warps = dec.gather_blocks(d, K)
            for slots in ([1] if quick else [1, 2]):
                out.append((f"gather d={d} k={K} S={slots}", dec._gather_sum_kernel,
                            dict(coef_ptr="*fp32", idx_ptr="*i64", r_ptr="*bf16", out_ptr="*bf16"),
                            dict(stride_rd=1, SLOTS=slots, BJ=BJ, BD=BD, INTERP=False), ("K", "D", "stride_rn", "stride_ob", "stride_os"),
                            warps, 3))
        BP, BD, warps = dec.segment_blocks(d)
        for per_atom, dcoef, csum in ([(True, True, False)] if quick else
                                      [(True, True, False), (True, False, False), (False, False, True)]):
            for slots in ([1] if quick else [1, 2]):
                out.append((f"segment d={d} per_atom={per_atom} dcoef={dcoef} S={slots}", dec._segment_kernel,
                            dict(order_ptr="*i64", offsets_ptr="*i64", idx_ptr="*i64", coef_ptr="*fp32",
                                 g_ptr="*fp32", r_ptr="*fp32", dr_ptr="*fp32", dcoef_ptr="*fp32", csum_ptr="*fp32"),
                            dict(stride_rd=1, SLOTS=slots, PER_ATOM=per_atom, DCOEF=dcoef, CSUM=csum, BP=BP, BD=BD,
                                 INTERP=False),
                            ("K", "D", "stride_g", "stride_rn", "stride_dr"), warps, 3))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    failed = 0
    for name, fn, ptrs, const, div, warps, stages in configurations(args.quick):
        try:
            r = compile_kernel(fn, ptrs, const, div, warps, stages, args.arch)
            flag = "  SPILLS" if r["spill_bytes"] > 0 else ""
            print(f"{name:<48} regs {r['regs']:>3}  spill {r['spill_bytes']:>4} B  smem {r['smem']:>6}  "
                  f"wgmma {r['wgmma']}{flag}", flush=True)
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"{name:<48} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            print(e, file=sys.stderr)
    if failed:
        print(f"{failed} configuration(s) failed to compile")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
