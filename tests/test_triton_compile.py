"""Every kernel compiles for real GPUs (sm_80, sm_89, sm_90) and fits their shared memory — without a GPU.

The interpreter runs programs that a GPU compiler rejects (dot blocks under 16, mismatched types across the
branches of a runtime `if`, ...) and knows nothing of shared memory.  Triton's wheel ships the whole NVIDIA
tool chain (MLIR passes, LLVM, ptxas), so this module re-runs itself in a subprocess with TRITON_INTERPRET=0,
replaces every kernel launch of the public wrappers by `triton.compile(...)` for a GPUTarget down to a cubin,
and reports each kernel's shared memory, which the test compares with the architecture's limit.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the test process itself; the subprocess sets 0

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton
KERNELS = {"_flash_prefill_kernel", "_decode_split_kernel", "_decode_merge_kernel", "_moe_align_kernel",
           "_moe_gemm1_swiglu_kernel", "_moe_gemm2_kernel", "_moe_sum_slots_kernel", "_rms_norm_kernel",
           "_rope_kernel", "_latent_split_kernel"}  # latent decode merges with _decode_merge_kernel
SHARED_LIMIT = {80: 166912, 89: 101376, 90: 232448}  # bytes of shared memory a block may opt in to


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [(90, "bfloat16"), (89, "float16"), (80, "float32")])
def test_every_kernel_compiles_for_the_gpu(arch, dtype):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's packages, not an install
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, __file__, str(arch), dtype], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in results} == KERNELS
    for r in results:
        assert r["shared"] <= SHARED_LIMIT[arch], f"{r['kernel']} needs {r['shared']} bytes of shared memory"


def compile_everything(arch: int, dtype_name: str) -> list[dict]:
    """Run the wrappers on CPU tensors, compiling (not launching) each distinct kernel specialisation."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton_kernels as tk
    from triton_kernels import flash_attention, flash_common, flash_decoding, latent_decode, moe, norm, rope

    type_names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                  torch.int32: "i32"}
    launch_options = ("num_warps", "num_stages")
    results, seen = [], set()

    class CompileInsteadOfLaunch:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                constexprs = {k: v for k, v in kwargs.items() if k not in launch_options}
                options = {k: v for k, v in kwargs.items() if k in launch_options}
                names = [n for n in self.fn.arg_names if n not in constexprs]
                assert len(names) == len(args), f"{self.fn.__name__}: {len(args)} arguments for {names}"
                signature = {}
                for n, a in zip(names, args):
                    if isinstance(a, torch.Tensor):
                        signature[n] = "*" + type_names[a.dtype]
                    elif isinstance(a, bool):
                        signature[n] = "i1"
                    elif isinstance(a, int):
                        signature[n] = "i32" if -(2**31) <= a < 2**31 else "i64"
                    else:
                        signature[n] = "fp32"
                signature.update({n: "constexpr" for n in constexprs})
                key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(map(str, kwargs.items()))))
                if key in seen:
                    return
                seen.add(key)
                kernel = triton.compile(ASTSource(self.fn, signature, constexprs),
                                        target=GPUTarget("cuda", arch, 32), options=options)
                assert kernel.asm["cubin"], self.fn.__name__
                results.append({"kernel": self.fn.__name__, "shared": kernel.metadata.shared,
                                "constexprs": {k: str(v) for k, v in constexprs.items()}})

            return launch

    for module in (flash_common, flash_attention, flash_decoding, latent_decode, moe, norm, rope):
        module.check_device = lambda where, *tensors: None  # CPU tensors stand in for GPU ones
        for name in KERNELS & set(vars(module)):
            setattr(module, name, CompileInsteadOfLaunch(getattr(module, name)))

    dtype = getattr(torch, dtype_name)
    q = torch.randn(1, 80, 8, 128).to(dtype)
    k = torch.randn(1, 80, 2, 128).to(dtype)
    pos = torch.arange(80)[None]
    with torch.no_grad():
        tk.prefill_attention(q, k, k, pos, pos, 32)  # contiguous positions, sliding window
        tk.prefill_attention(q, k, k, pos, pos.flip(1), None)  # any layout, full causal
        tk.decode_attention(q[:, :1], k, k, pos[:, :1], pos, 16, num_splits=2)
        x = torch.randn(10, 64).to(dtype)
        w13 = torch.randn(8, 96, 64).to(dtype)
        tk.moe_forward(x, torch.randn(8, 64).to(dtype), w13, torch.randn(8, 64, 96).to(dtype), w13, 2)
        tk.rms_norm(torch.randn(4, 4096).to(dtype), torch.ones(4096).to(dtype), 1e-5)
        cos, sin = torch.randn(1, 80, 64), torch.randn(1, 80, 64)
        tk.apply_rotary_emb(q, cos, sin)
        # latent decode at Mistral Large 3's widths (kv_lora_rank 512, rotary 64, 128 heads; Small 4: 256, 64, 32)
        q_latent, q_rope = torch.randn(2, 128, 512).to(dtype), torch.randn(2, 128, 64).to(dtype)
        latents, k_rope = torch.randn(2, 80, 512).to(dtype), torch.randn(2, 80, 64).to(dtype)
        tk.latent_decode_attention(q_latent, q_rope, latents, k_rope, pos[:, :1].expand(2, 1), pos.expand(2, 80),
                                   0.1, num_splits=2)
    return results


if __name__ == "__main__":
    assert os.environ["TRITON_INTERPRET"] == "0"
    print(json.dumps(compile_everything(int(sys.argv[1]), sys.argv[2])))
