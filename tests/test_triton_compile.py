"""Every Triton kernel compiles for the H100 (sm_90) through Triton's real compiler, not only
under the interpreter: without a GPU this is the check that the GPU build of each kernel exists.
Runs in a subprocess because the interpreter (TRITON_INTERPRET=1, set by conftest) replaces the
compiler in this process."""

import os
import subprocess
import sys
import textwrap

import pytest

from neurokern.triton_kernels import triton_error

SCRIPT = textwrap.dedent('''
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from neurokern.plif_ops import LAUNCH
    from neurokern.triton_kernels.plif import plif_bwd_kernel, plif_fwd_kernel
    from neurokern.triton_kernels.spike import spike_bwd_kernel, spike_fwd_kernel
    from neurokern.triton_kernels.spikgru2plus import (
        spikgru2plus_step_bwd_kernel, spikgru2plus_step_fwd_kernel)

    COMPUTE = ("params_ptr", "v_saved_ptr", "alpha_ptr", "dalpha_ptr", "bias_ptr")
    # SpikGRU2+: the state and the gate inputs and gradients are in the compute dtype; only the
    # products' operands and results (gh, dgh, s_mm, ds_rec) are in `dtype` (bf16 under autocast).
    GRU_LOW = ("gh_ptr", "dgh_ptr", "s_mm_ptr", "ds_rec_ptr")

    def compile_for_h100(fn, dtype, consts, num_warps=4, divisible=()):
        compute = "fp64" if dtype == "fp64" else "fp32"
        # constexprs with a default (the generalised neuron's switches) as a launch gives them
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default},
                  **consts}
        low = lambda name: name in GRU_LOW if "spikgru2plus" in fn.__name__ else (
            name not in COMPUTE)
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name == "active_ptr":  # SpikGRU2+'s per-row flags of variable lengths
                sig[name] = "*i8"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (dtype if low(name) else compute)
            else:
                sig[name] = "i32"
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        # pointers 16-byte aligned and the integers in `divisible` multiples of 16, as Triton's
        # launcher specialises them for fresh tensors of such sizes
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if (name.endswith("_ptr") or name in divisible) and name not in consts}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs,
                                          attrs=attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps))
        print("compiled", fn.__name__, dtype, consts, flush=True)
        return kernel.asm["ptx"]

    def assert_vectorised(ptx, dtype, size):
        """Accesses of the element size are vectors (bf16: no 2-byte access at all; wider
        dtypes: vectors present, beside scalar loads of the kernels' float32 parameters)."""
        width = 8 * size
        scalar = re.findall(rf"(?:ld|st)\\.global\\.b{width}\\b", ptx)
        vector = re.findall(rf"(?:ld|st)\\.global\\.v\\d\\.b{width}\\b", ptx)
        assert vector if size > 2 else not scalar, (dtype, scalar, vector)

    for dtype, size in (("fp32", 4), ("bf16", 2), ("fp64", 8)):
        launch = LAUNCH[size]  # the PLIF kernels as plif_ops launches them
        for packed in (False, True):
            layout = dict(PACKED=packed, ALIGN=16 // size if packed else 1,
                          CHUNK=launch["checkpoint"], BLOCK=launch["BLOCK"])
            ptx = [compile_for_h100(plif_fwd_kernel, dtype, dict(
                HAS_STATE=True, SAVE=True, SIGNED=True, SPIKING=dtype != "fp64", **layout),
                num_warps=launch["num_warps"])]
            ptx.append(compile_for_h100(plif_bwd_kernel, dtype, dict(
                HAS_GRAD_V_LAST=True, HAS_GRAD_S_LAST=True, HAS_STATE=True, SIGNED=True,
                SPIKING=dtype != "fp64", DETACH_RESET=False, **layout),
                num_warps=launch["num_warps"]))
            # the PACKED path exists for its vector loads and stores of x, s, dL/ds and dx
            for text in ptx if packed else ():
                assert_vectorised(text, dtype, size)
        if dtype == "fp32":  # the generalised neuron's kernels (docs/neurons.md), strided
            general = dict(GENERAL=True, BEFORE=True, SIGMOID=True, PACKED=False, ALIGN=1,
                           CHUNK=launch["checkpoint"], BLOCK=launch["BLOCK"])
            compile_for_h100(plif_fwd_kernel, dtype, dict(
                HAS_STATE=True, SAVE=True, SIGNED=False, SPIKING=True, **general),
                num_warps=launch["num_warps"])
            compile_for_h100(plif_bwd_kernel, dtype, dict(
                HAS_GRAD_V_LAST=True, HAS_GRAD_S_LAST=True, HAS_STATE=True, SIGNED=False,
                SPIKING=True, DETACH_RESET=False, **general), num_warps=launch["num_warps"])
        for fn, consts in ((spike_fwd_kernel, dict(SIGNED=True, SPIKING=True, BLOCK=1024)),
                           (spike_bwd_kernel, dict(SIGNED=False, BLOCK=1024))):
            assert_vectorised(compile_for_h100(fn, dtype, consts, divisible=("n",)), dtype, size)
    for dtype in ("fp32", "bf16", "fp64"):
        compile_for_h100(spikgru2plus_step_fwd_kernel, dtype, dict(
            RESET_GATE=True, HAS_BIAS=True, SIGNED=True, SPIKING=dtype != "fp64",
            STORE_S_MM=dtype == "bf16", HAS_LENGTHS=dtype == "fp32", BLOCK=128))
        compile_for_h100(spikgru2plus_step_bwd_kernel, dtype, dict(
            RESET_GATE=True, HAS_BIAS=True, SIGNED=True, HAS_DS_REC=True, HAS_GRAD_PREV=True,
            HAS_LENGTHS=dtype == "fp32", BLOCK=128))
''')


@pytest.mark.skipif(triton_error is not None, reason=f"triton not importable: {triton_error}")
def test_triton_kernels_compile_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 26
