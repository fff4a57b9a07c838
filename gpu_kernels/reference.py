"""The plain PyTorch attention every fast path is tested against. Imports only torch (no Triton):
cheap anywhere."""

import torch


def attention_reference(q, k, v, sm_scale=None):
    """softmax(q k^T * sm_scale) v in fp32 math, returned in q's dtype.
    q (B, heads, Lq, D), k/v (B, heads, Lk, D).

    sm_scale defaults to 1 / sqrt(D) (Vaswani et al. 2017). Non-causal, no mask, no dropout.
    """
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # B, heads, Lq, Lk
    p = torch.softmax(s, dim=-1)  # B, heads, Lq, Lk
    return torch.matmul(p, v.float()).to(q.dtype)  # B, heads, Lq, D
