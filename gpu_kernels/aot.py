"""
Ahead-of-time compilation of the attention kernels
(gpu_kernels/flash_attention.py) for GPUs this machine lacks.

    # returns a Record: shared memory, warps, seconds, error
    rec = compile_for("_attn_fwd", config, "bf16", 128, SM90)
    # the (kernel, config) pairs the autotuner may pick
    jobs = kernel_configs(128)

triton.compile lowers a kernel to a cubin for a target given by hand (ptxas ships in the triton
wheel), no GPU or driver needed. That catches what only shows on the GPU: compiler errors in one
config, or a config whose shared memory exceeds the device's limit per block (Triton refuses to
launch it, OutOfResources).

The compiled launch is the common one: contiguous inputs (unit last stride, pointers and other
strides 16-aligned, as Triton specialises them at launch), sequence lengths that are not block
multiples (EVEN_M = EVEN_N = False, the masked path).

Needs triton.language imported without TRITON_INTERPRET=1 (its helpers tl.sum, tl.max must be JIT
functions); under the interpreter, run this in a fresh process without the variable
(see tests/test_kernel_aot.py).
"""

import inspect
import time
from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from gpu_kernels import flash_attention as fa


@dataclass(frozen=True)
class Target:
    name: str
    arch: int  # compute capability, 90 = sm_90
    shared_limit: int  # bytes of shared memory one block may use (the opt-in maximum)


# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability":
# maximum shared memory per thread block 227 KB on 9.0, 163 KB on 8.0.
SM90 = Target("sm_90 (H100/H200)", 90, 227 * 1024)
SM80 = Target("sm_80 (A100)", 80, 163 * 1024)
CHECKS = [("bf16", SM90), ("fp16", SM80)]  # (dtype, target) pairs the kernels are compiled for

# Each kernel's launch configs, from the lists its triton.autotune decorator holds on the
# GPU (the interpreter's single small config is not the one GPUs run); the preprocess kernel
# has one fixed block.
_CONFIGS = {
    "_attn_fwd": lambda: fa._fwd_configs(interpret=False),
    "_attn_bwd_preprocess": lambda: [triton.Config({"BLOCK_M": fa._PRE_BLOCK_M})],
    "_attn_bwd_dkdv": lambda: fa._bwd_configs(interpret=False),
    "_attn_bwd_dq": lambda: fa._bwd_configs(interpret=False),
}
KERNELS = list(_CONFIGS)


@dataclass
class Record:
    kernel: str
    config: str
    target: str
    dtype: str
    head_dim: int
    shared_limit: int
    shared: Optional[int] = None  # bytes of shared memory per block
    num_warps: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def ok(self):
        return self.error is None

    @property
    def fits(self):
        return self.ok and self.shared <= self.shared_limit


def describe(config):
    """'BLOCK_M=128 BLOCK_N=64 warps=8 stages=3'."""
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


def _head_dim_pad(head_dim):
    # as _kernel_constants in gpu_kernels/flash_attention.py
    return max(16, triton.next_power_of_2(head_dim))


def kernel_configs(head_dim, largest_only=False):
    """(kernel name, triton.Config) for every kernel and every config its autotuner may
    pick at this head dim.

    The kernels' own pruning (_prune_configs) is applied with long sequences, so only its head-dim
    rule drops configs. largest_only: per kernel, the configs with the largest BLOCK_M * BLOCK_N,
    then the most stages; all that tie, since 128x64 and 64x128 tiles stage differently sized
    blocks in shared memory.
    """
    long_seq = {"N_CTX_Q": 1 << 16, "N_CTX_K": 1 << 16}
    jobs = []
    for kernel, configs in _CONFIGS.items():
        configs = configs()
        if len(configs) > 1:
            configs = fa._prune_configs(configs, long_seq, HEAD_DIM_PAD=_head_dim_pad(head_dim))
        if largest_only:
            size = lambda c: (c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", 1), c.num_stages)  # noqa: E731
            configs = [c for c in configs if size(c) == max(map(size, configs))]
        jobs += [(kernel, c) for c in configs]
    return jobs


def _source(kernel, config, dtype, head_dim):
    """The ASTSource of one specialisation: per-argument types,
    constexpr values and divisibility hints."""
    # Unwrap autotune / heuristics (.fn) down to the Python function and jit it afresh:
    # under TRITON_INTERPRET the module's kernels are InterpretedFunctions, which
    # triton.compile cannot take.
    fn = getattr(fa, kernel)
    while not inspect.isfunction(fn):
        fn = fn.fn
    fn = JITFunction(fn)
    values = dict(
        config.kwargs,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_head_dim_pad(head_dim),
        DOT_PRECISION=None,  # None: the default (tensor-core) dot
        EVEN_M=False,
        EVEN_N=False,
    )
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", values[p.name]
        elif p.name.startswith("stride_") and p.name.endswith("d"):
            # stride over D: 1, a constant at launch
            signature[p.name], constexprs[p.name] = "constexpr", 1
        elif p.name.startswith("stride_"):
            signature[p.name], attrs[(i,)] = "i32", aligned
        elif p.name in ("H", "N_CTX_Q", "N_CTX_K"):
            signature[p.name] = "i32"
        elif p.name == "sm_scale":
            signature[p.name] = "fp32"
        else:  # a tensor: logsumexp and delta are fp32, the rest the input dtype
            signature[p.name] = "*fp32" if p.name in ("LSE", "DELTA") else f"*{dtype}"
            attrs[(i,)] = aligned
    return ASTSource(fn, signature, constexprs, attrs)


def compile_for(kernel, config, dtype, head_dim, target):
    """Compile one kernel in one config for dtype ("bf16", "fp16", "fp32") and head_dim on target
    -> Record.

    A failure is recorded in Record.error, not raised.
    """
    rec = Record(kernel, describe(config), target.name, dtype, head_dim, target.shared_limit)
    if not isinstance(tl.sum, JITFunction):
        rec.error = (
            "triton.language was imported with TRITON_INTERPRET=1; compile in a process without it"
        )
        return rec
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(
            _source(kernel, config, dtype, head_dim),
            target=GPUTarget("cuda", target.arch, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
        rec.shared, rec.num_warps = compiled.metadata.shared, compiled.metadata.num_warps
    except Exception as e:  # a compiler or ptxas error of this one config
        rec.error = (
            f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        )
    rec.seconds = time.perf_counter() - t0
    return rec


def ptxas_path():
    """The ptxas binary triton uses, or None when there is none (no AOT compiles possible)."""
    try:
        return triton.knobs.nvidia.ptxas.path
    except RuntimeError:
        return None
