"""The optimizer and the weight average of a training run."""

import torch


def adamw(params, lr, betas, eps, weight_decay, device):
    """AdamW over `params`, weight decay on matrices and kernels only (not on biases and norms),
    fused into one kernel on CUDA and the CPU."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


@torch.no_grad()
def ema_update(ema, live, decay, step):
    """ema <- lerp(ema, live, 1 - d) with d = min(decay, (1 + step) / (10 + step)) (the warm-up of
    the average lets early steps count more), over the parameters that train: frozen ones (a LoRA
    run's base weights) stay equal."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(e, p) for e, p in zip(ema.parameters(), live.parameters()) if p.requires_grad]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)
