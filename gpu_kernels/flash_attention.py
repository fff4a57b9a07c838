"""
Fused attention (FlashAttention-2) in Triton, forward and backward, for the text2earth U-Net.

    o = flash_attention(q, k, v)      # q (B, heads, Lq, D), k/v (B, heads, Lk, D) -> o like q
    o = attention_reference(q, k, v)  # the same in plain PyTorch (fp32 math; reference.py)

Algorithm: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(arXiv 2307.08691), Algorithm 1 (forward, online softmax over key blocks, logsumexp kept for the
backward) and Algorithm 2 (backward; here split into one kernel for dK/dV looping over query blocks
and one for dQ looping over key blocks, so no atomics are needed). Layout follows Triton's
fused-attention tutorial.

What the U-Net needs beyond the textbook kernel:
  - Lq != Lk (cross-attention: 1024/256/64 queries against 77 text tokens), lengths that are
    not multiples of any block size: keys are masked in the softmax, query rows beyond Lq are
    masked on load and store;
  - head dims 32/40/64/80/96/128: the block's D is padded to the next power of
    two with masked loads;
  - many (batch x heads) with short sequences: the grid is (query blocks, B * heads), block sizes
    are tuned per (Lq, Lk, D) with triton.autotune (one fixed small config under
    TRITON_INTERPRET=1);
  - fp32 / fp16 / bf16 inputs with fp32 accumulation; arbitrary strides
    (no copies for transposed views).

Non-causal, no dropout, no attention mask.
"""

import math
import os

import torch

from gpu_kernels.reference import attention_reference  # noqa: F401  the definition the kernel is tested against

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS wheels of torch ship no Triton: only attention_reference is usable
    triton = None

# Triton decides at `@triton.jit` time (i.e. when this module is imported) whether kernels run
# compiled on the GPU or in its numpy interpreter; record that decision.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

MAX_HEAD_DIM = 128
# query rows per program of _attn_bwd_preprocess on the GPU (16 in the interpreter)
_PRE_BLOCK_M = 64
# The kernels write 1.44269504 = 1 / ln(2) = log2(e) inline: exp(x) == exp2(x * 1.44269504), and
# exp2 is the GPU's native instruction (a Python global would have to be a tl.constexpr to be
# visible inside a kernel).


def is_available():
    """True when the Triton kernel can run here: triton imports and
    (CUDA is available or TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


# -----------------------------------------------------------------------------
# Kernels

if triton is not None:

    def _fwd_configs(interpret=_INTERPRET):
        if interpret:  # the interpreter is slow: one small config, no tuning
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 128, 8, 3),
                (128, 64, 8, 3),
                (128, 64, 4, 3),
                (128, 32, 4, 4),
                (64, 128, 4, 3),
                (64, 64, 4, 3),
                (64, 32, 4, 4),
                (32, 128, 4, 2),
                (32, 64, 4, 3),
                (32, 32, 4, 3),
                (16, 128, 4, 2),
                (16, 64, 4, 3),
                (16, 32, 4, 3),
            ]
        ]

    def _bwd_configs(interpret=_INTERPRET):
        # BLOCK_M: query block, BLOCK_N: key block (the dK/dV kernel keeps a key block,
        # the dQ kernel a query block)
        if interpret:
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 64, 8, 2),
                (64, 128, 8, 2),
                (64, 64, 4, 2),
                (64, 64, 4, 3),
                (32, 128, 4, 2),
                (128, 32, 4, 2),
                (32, 64, 4, 3),
                (64, 32, 4, 3),
                (32, 32, 4, 3),
                (16, 64, 4, 3),
                (64, 16, 4, 3),
                (16, 32, 4, 3),
            ]
        ]

    def _prune_configs(configs, named_args, **kwargs):
        """Drop configs whose blocks are far larger than the sequence,
        or too large for D = 128 registers."""
        max_m = max(16, triton.next_power_of_2(named_args["N_CTX_Q"]))
        max_n = max(32, triton.next_power_of_2(named_args["N_CTX_K"]))
        d_pad = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD", 64))
        kept = [
            c
            for c in configs
            if c.kwargs["BLOCK_M"] <= max_m
            and c.kwargs["BLOCK_N"] <= max_n
            and not (d_pad > 64 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)
        ]
        if not kept:  # keep the smallest blocks
            kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept

    # the autotuner adds the tensors' dtypes to the key
    _TUNE_KEY = ["N_CTX_Q", "N_CTX_K", "HEAD_DIM"]
    _EVEN_N = lambda args: args["N_CTX_K"] % args["BLOCK_N"] == 0  # noqa: E731  no key masking needed
    _EVEN_M = lambda args: args["N_CTX_Q"] % args["BLOCK_M"] == 0  # noqa: E731  no query-row masking needed

    # -- forward ------------------------------------------------------------

    @triton.autotune(
        configs=_fwd_configs(),
        key=_TUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.heuristics({"EVEN_N": _EVEN_N})
    @triton.jit
    def _attn_fwd(  # noqa: PLR0913 (a Triton kernel's pointers, strides and sizes)
        Q,
        K,
        V,
        Out,
        LSE,
        sm_scale,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        H,
        N_CTX_Q,
        N_CTX_K,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one (batch, head). FA2 Algorithm 1."""
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // H).to(tl.int64)
        off_h = (off_bh % H).to(tl.int64)
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_h * stride_kh
        V += off_b * stride_vb + off_h * stride_vh
        Out += off_b * stride_ob + off_h * stride_oh

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        # (D_PAD,) padded to a power of two, masked beyond HEAD_DIM
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask_d = offs_d < HEAD_DIM
        mask_m = offs_m < N_CTX_Q

        q = tl.load(
            Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )  # (BLOCK_M, D_PAD)
        k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # (BLOCK_N, D_PAD)
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D_PAD)

        # Scores are kept in log2 units, s * log2(e), so that exp(s - m) == exp2((s - m) * log2(e)).
        qk_scale = sm_scale * 1.44269504  # 1.44269504 = 1 / ln(2)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)  # running unnormalised output

        for start_n in range(0, N_CTX_K, BLOCK_N):
            if EVEN_N:
                kv_mask = mask_d[None, :]
            else:
                kv_mask = ((start_n + offs_n)[:, None] < N_CTX_K) & mask_d[None, :]
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            # (BLOCK_M, BLOCK_N)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if not EVEN_N:
                # keys beyond Lk get zero weight; every block holds at least one real key
                qk = tl.where((start_n + offs_n)[None, :] < N_CTX_K, qk, float("-inf"))
            # online softmax (FA2 Algorithm 1, lines 8-10):
            # rescale the old sums by exp2(m_old - m_new)
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
            p = tl.math.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
            alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,) 0 on the first block (m_i = -inf)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, D_PAD)
            m_i = m_new

        # epilogue (FA2 Algorithm 1, lines 12-13): normalise, keep logsumexp
        # (log2 units) for the backward
        acc = acc / l_i[:, None]
        tl.store(LSE + off_bh.to(tl.int64) * N_CTX_Q + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)
        tl.store(
            Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
            acc.to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )

    # -- backward -----------------------------------------------------------

    @triton.jit
    def _attn_bwd_preprocess(  # noqa: PLR0913 (a Triton kernel's pointers, strides and sizes)
        Out,
        DO,
        DELTA,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        H,
        N_CTX_Q,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """delta_i = sum_d dO_id * O_id (FA2 Algorithm 2, line 4), in fp32."""
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // H).to(tl.int64)
        off_h = (off_bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask = (offs_m[:, None] < N_CTX_Q) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(
            Out
            + off_b * stride_ob
            + off_h * stride_oh
            + offs_m[:, None] * stride_om
            + offs_d[None, :] * stride_od,
            mask=mask,
            other=0.0,
        ).to(tl.float32)  # (BLOCK_M, D_PAD)
        do = tl.load(
            DO
            + off_b * stride_dob
            + off_h * stride_doh
            + offs_m[:, None] * stride_dom
            + offs_d[None, :] * stride_dod,
            mask=mask,
            other=0.0,
        ).to(tl.float32)  # (BLOCK_M, D_PAD)
        tl.store(
            DELTA + off_bh.to(tl.int64) * N_CTX_Q + offs_m,
            tl.sum(o * do, axis=1),
            mask=offs_m < N_CTX_Q,
        )

    @triton.autotune(
        configs=_bwd_configs(),
        key=_TUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.heuristics({"EVEN_M": _EVEN_M, "EVEN_N": _EVEN_N})
    @triton.jit
    def _attn_bwd_dkdv(  # noqa: PLR0913 (a Triton kernel's pointers, strides and sizes)
        Q,
        K,
        V,
        DO,
        DK,
        DV,
        LSE,
        DELTA,
        sm_scale,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_dkb,
        stride_dkh,
        stride_dkn,
        stride_dkd,
        H,
        N_CTX_Q,
        N_CTX_K,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_M: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        """One program: dK, dV for BLOCK_N keys of one (batch, head), looping over all query blocks.

        FA2 Algorithm 2 with P recomputed from the stored logsumexp:
          P^T = exp2(K Q^T * scale * log2(e) - lse),  dV = P^T dO,  dP^T = V dO^T,
          dS^T = P^T * (dP^T - delta),  dK = scale * dS^T Q.
        DK and DV share one layout (strides stride_dk*).
        """
        start_n = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // H).to(tl.int64)
        off_h = (off_bh % H).to(tl.int64)
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_h * stride_kh
        V += off_b * stride_vb + off_h * stride_vh
        DO += off_b * stride_dob + off_h * stride_doh
        DK += off_b * stride_dkb + off_h * stride_dkh
        DV += off_b * stride_dkb + off_h * stride_dkh
        LSE += off_bh.to(tl.int64) * N_CTX_Q
        DELTA += off_bh.to(tl.int64) * N_CTX_Q

        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask_d = offs_d < HEAD_DIM
        kv_mask = (offs_n[:, None] < N_CTX_K) & mask_d[None, :]
        # Key rows beyond Lk load as zeros, get P = 0 below, and are never stored.
        k = tl.load(
            K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
        )
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
        )
        q_ptrs = Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd  # (BLOCK_M, D_PAD)
        # (BLOCK_M, D_PAD)
        do_ptrs = DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod

        qk_scale = sm_scale * 1.44269504  # 1.44269504 = 1 / ln(2), as in the forward
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
        for start_m in range(0, N_CTX_Q, BLOCK_M):
            rows = start_m + offs_m
            if EVEN_M:
                q_mask = mask_d[None, :]
                lse = tl.load(LSE + rows)
                delta = tl.load(DELTA + rows)
            else:  # rows beyond Lq: lse = +inf makes their P exactly 0, so they add nothing
                q_mask = (rows[:, None] < N_CTX_Q) & mask_d[None, :]
                lse = tl.load(LSE + rows, mask=rows < N_CTX_Q, other=float("inf"))
                delta = tl.load(DELTA + rows, mask=rows < N_CTX_Q, other=0.0)
            q = tl.load(q_ptrs + start_m * stride_qm, mask=q_mask, other=0.0)  # (BLOCK_M, D_PAD)
            do = tl.load(do_ptrs + start_m * stride_dom, mask=q_mask, other=0.0)  # (BLOCK_M, D_PAD)
            # (BLOCK_N, BLOCK_M)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            if not EVEN_N:
                # padded keys: P = 0 (exp2(0 - lse) could overflow to inf in rows never stored)
                qkT = tl.where(offs_n[:, None] < N_CTX_K, qkT, float("-inf"))
            # (BLOCK_N, BLOCK_M) softmax probabilities, transposed
            pT = tl.math.exp2(qkT - lse[None, :])
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # (BLOCK_N, D_PAD)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])  # (BLOCK_N, BLOCK_M) softmax backward
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # (BLOCK_N, D_PAD)
        dk = dk * sm_scale  # the scale multiplies the scores: chain rule

        out_offs = offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.autotune(
        configs=_bwd_configs(),
        key=_TUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.heuristics({"EVEN_N": _EVEN_N})
    @triton.jit
    def _attn_bwd_dq(  # noqa: PLR0913 (a Triton kernel's pointers, strides and sizes)
        Q,
        K,
        V,
        DO,
        DQ,
        LSE,
        DELTA,
        sm_scale,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_dqb,
        stride_dqh,
        stride_dqm,
        stride_dqd,
        H,
        N_CTX_Q,
        N_CTX_K,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        """One program: dQ for BLOCK_M queries of one (batch, head), looping over all key blocks.

        FA2 Algorithm 2: P = exp2(Q K^T * scale * log2(e) - lse), dP = dO V^T,
        dS = P * (dP - delta), dQ = scale * dS K.
        """
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // H).to(tl.int64)
        off_h = (off_bh % H).to(tl.int64)
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_h * stride_kh
        V += off_b * stride_vb + off_h * stride_vh
        DO += off_b * stride_dob + off_h * stride_doh
        DQ += off_b * stride_dqb + off_h * stride_dqh

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask_d = offs_d < HEAD_DIM
        mask_m = offs_m < N_CTX_Q
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(
            Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0
        )
        do = tl.load(
            DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0
        )
        # rows beyond Lq: lse = +inf gives P = 0 (their dQ rows are not stored anyway)
        # (BLOCK_M,)
        lse = tl.load(LSE + off_bh.to(tl.int64) * N_CTX_Q + offs_m, mask=mask_m, other=float("inf"))
        # (BLOCK_M,)
        delta = tl.load(DELTA + off_bh.to(tl.int64) * N_CTX_Q + offs_m, mask=mask_m, other=0.0)
        k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # (BLOCK_N, D_PAD)
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D_PAD)

        qk_scale = sm_scale * 1.44269504  # 1.44269504 = 1 / ln(2), as in the forward
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        for start_n in range(0, N_CTX_K, BLOCK_N):
            if EVEN_N:
                kv_mask = mask_d[None, :]
            else:
                kv_mask = ((start_n + offs_n)[:, None] < N_CTX_K) & mask_d[None, :]
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            # (BLOCK_M, BLOCK_N)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if not EVEN_N:
                # padded keys score 0 and exp2(0 - lse) can overflow: give them -inf, so P = 0
                qk = tl.where((start_n + offs_n)[None, :] < N_CTX_K, qk, float("-inf"))
            p = tl.math.exp2(qk - lse[:, None])  # (BLOCK_M, BLOCK_N)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # (BLOCK_M, D_PAD)
        dq = dq * sm_scale

        tl.store(
            DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
            dq.to(DQ.dtype.element_ty),
            mask=q_mask,
        )


# -----------------------------------------------------------------------------
# autograd.Function and the public entry point

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"flash_attention: {name} must have shape (B, heads, L, D), got {tuple(t.shape)}"
            )
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"flash_attention: {name} has dtype {t.dtype}; supported: fp16, bf16, fp32"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"flash_attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape"
        )
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in (B, heads)"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"flash_attention: head dim D of q ({q.shape[3]}) and k/v ({k.shape[3]}) differ"
        )
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(
            f"flash_attention: head dim D = {q.shape[3]} > {MAX_HEAD_DIM} is not supported"
        )
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(
            f"flash_attention: B * heads = {q.shape[0] * q.shape[1]} exceeds the grid limit 65535"
        )
    if triton is None:
        raise ValueError("flash_attention: triton is not installed; use attention_reference")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError(
            f"flash_attention: inputs are on {q.device}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing gpu_kernels.flash_attention)"
        )


def _kernel_constants(q):
    D = q.shape[-1]
    return dict(
        HEAD_DIM=D,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)),  # tl.dot needs a power of two >= 16
        DOT_PRECISION="ieee"
        if q.dtype == torch.float32
        else None,  # fp32 inputs: true fp32 dots, not tf32
    )


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sm_scale):
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        const = _kernel_constants(q)
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, heads, Lq, D)
        # logsumexp, log2 units
        lse = torch.empty((B * H, Lq), dtype=torch.float32, device=q.device)
        grid = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd[grid](
            q,
            k,
            v,
            o,
            lse,
            sm_scale,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *o.stride(),
            H,
            Lq,
            Lk,
            **const,
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        const = _kernel_constants(q)
        if do.dtype != q.dtype:
            do = do.to(q.dtype)
        delta = torch.empty_like(lse)  # (B * heads, Lq)
        pre_block = 16 if _INTERPRET else _PRE_BLOCK_M
        _attn_bwd_preprocess[(triton.cdiv(Lq, pre_block), B * H)](
            o,
            do,
            delta,
            *o.stride(),
            *do.stride(),
            H,
            Lq,
            HEAD_DIM=const["HEAD_DIM"],
            HEAD_DIM_PAD=const["HEAD_DIM_PAD"],
            BLOCK_M=pre_block,
        )

        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        # same layout as dk (the kernel assumes it)
        dv = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        grid_kv = lambda META: (triton.cdiv(Lk, META["BLOCK_N"]), B * H)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            ctx.sm_scale,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *do.stride(),
            *dk.stride(),
            H,
            Lq,
            Lk,
            **const,
        )
        grid_q = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H)  # noqa: E731
        _attn_bwd_dq[grid_q](
            q,
            k,
            v,
            do,
            dq,
            lse,
            delta,
            ctx.sm_scale,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *do.stride(),
            *dq.stride(),
            H,
            Lq,
            Lk,
            **const,
        )
        return dq, dk, dv, None


def flash_attention(q, k, v, sm_scale=None):
    """Fused softmax(q k^T * sm_scale) v, differentiable.
    q (B, heads, Lq, D), k/v (B, heads, Lk, D) -> o like q.

    sm_scale defaults to 1 / sqrt(D). Inputs may be fp16, bf16 or fp32 (all the same dtype), any
    strides. Accumulation is fp32; the output has q's dtype.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: sm_scale must be finite, got {sm_scale}")
    return _FlashAttention.apply(q, k, v, scale)
