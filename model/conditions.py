"""Conditions: what the U-Net is told besides x_t and t,
as one structure with one table of nulls and dropout.

A set of conditions is a plain dict, name -> value, batch first:
    raw      {"text": [B str], "level": (B,) float}
             what readers, users and sample.py give
    encoded  {"text": (B, L, D) context, "level": (B,) float}
             what the U-Net reads (Text2Earth.encode_conditions)
The table is ModelConfig.conditions (model/config.py): per condition the batch field it comes from,
its null value ("" for the text, 0.0 = "no resolution" for the level) and its DCA dropout
probability. How each one enters the U-Net: "text" is the cross-attention context; every name in
UNetConfig.scalar_conditions is embedded like the timestep and added to the time embedding
(the release's level). Training drops each condition to its null independently (Text2Earth's dynamic
condition adaptation, Liu et al. 2025); guidance takes one scale per condition (model/guidance.py).
Adding a condition = its entry in the table, its embedder, its reader field.

`request` is the one entry from what a user or a caller gives to the raw conditions: every script,
the previews, the demo, editing and evaluation build them through it, so a new condition in the
table is read everywhere without editing them.
"""

import torch


def request(cfg, n, text="", **values):
    """The raw conditions of n samples for the model `cfg` (a ModelConfig) describes,
    from what was given.

    text: one prompt for all, [n prompts], or encoded contexts (n or 1, L, D); values: a scalar
    condition by name, one number for all or n numbers; None, or a condition not given, is that
    condition's null. A name the model does not read is a ValueError naming those it reads."""
    unknown = sorted(
        name for name, v in values.items() if v is not None and name not in cfg.condition_names()
    )
    if unknown:
        raise ValueError(
            f"conditions {unknown}: this model does not read them (it reads "
            f"{list(cfg.condition_names())})"
        )
    cond = {}
    for name in cfg.condition_names():
        given = text if name == "text" else values.get(name)
        if name == "text" and torch.is_tensor(given):
            cond[name] = given.expand(n, *given.shape[1:]) if given.shape[0] == 1 else given
        elif name == "text":
            cond[name] = [given] * n if isinstance(given, str) else list(given)
        elif given is None:
            cond[name] = torch.full((n,), float(cfg.conditions[name].null))
        else:
            given = torch.as_tensor(given, dtype=torch.float32).reshape(-1)
            cond[name] = given.expand(n).clone() if given.numel() == 1 else given
    batch_size(cond)  # every entry has n rows, or a ValueError
    if batch_size(cond) != n:
        raise ValueError(f"conditions for {batch_size(cond)} samples, asked for {n}")
    return cond


def scales(cfg, scale=4.0, **own):
    """Guidance scales {condition: scale} in the model's order: every condition at `scale` (the
    release guides the text and the level jointly at 4.0) but those given their own in `own`
    (name=scale; None = at `scale`). A name the model does not read is a ValueError."""
    unknown = sorted(
        name for name, v in own.items() if v is not None and name not in cfg.condition_names()
    )
    if unknown:
        raise ValueError(
            f"guidance scales for {unknown}: this model does not read them (it reads "
            f"{list(cfg.condition_names())})"
        )
    return {name: scale if own.get(name) is None else own[name] for name in cfg.condition_names()}


def from_batch(cfg, batch):
    """A collated batch -> the raw conditions cfg (a ModelConfig) reads,
    from each condition's field."""
    cond = {}
    for name in cfg.condition_names():
        field = cfg.conditions[name].field
        if field not in batch:
            raise ValueError(
                f"condition {name!r} reads the batch field {field!r}, which the data does not have "
                f"(fields: {sorted(batch)})"
            )
        value = batch[field]
        cond[name] = list(value) if name == "text" else torch.as_tensor(value, dtype=torch.float32)
    return cond


def nulls(cfg, n, negative_prompt=None):
    """The null conditions for n samples (the negative prompt, if given, is the text's null: a
    string, or its encoded context (1, L, D))."""
    out = {}
    for name in cfg.condition_names():
        null = cfg.conditions[name].null
        if name == "text" and torch.is_tensor(negative_prompt):
            out[name] = negative_prompt.expand(n, *negative_prompt.shape[1:])
        elif name == "text":
            out[name] = [null if negative_prompt is None else negative_prompt] * n
        else:
            out[name] = torch.full((n,), float(null))
    return out


def drop(cfg, cond, generator, idx, global_batch):
    """DCA: each condition replaced by its null with its own probability, independently per sample
    and condition. The draws are made for the global batch of `global_batch` samples from
    `generator`, in the table's order; idx (B,) are this process's positions in it, so one process
    with batch 2B draws what two with B draw."""
    if batch_size(cond) != len(idx):
        raise ValueError(
            f"conditions of batch {batch_size(cond)} for {len(idx)} positions in the global batch"
        )
    out = {}
    for name in cfg.condition_names():
        p = cfg.conditions[name].p_drop
        dropped = (torch.rand(global_batch, generator=generator) < p)[idx]  # B
        value, null = cond[name], cfg.conditions[name].null
        if name == "text":
            out[name] = [null if d else v for v, d in zip(value, dropped.tolist())]
        else:
            out[name] = torch.where(dropped, torch.full_like(value, float(null)), value)
    return out


def batch_size(cond):
    """The batch of a set of conditions (every entry must agree)."""
    sizes = {len(v) for v in cond.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"conditions disagree on the batch size: { {k: len(v) for k, v in cond.items()} }"
        )
    return sizes.pop()


def expand(cond, n):
    """Encoded conditions with batch 1 or n -> batch n (a number becomes n copies)."""
    out = {}
    for name, v in cond.items():
        v = torch.as_tensor(v)
        if v.ndim == 0:
            v = v.reshape(1)
        if v.shape[0] not in (1, n):
            raise ValueError(f"condition {name!r} has batch {v.shape[0]}, expected 1 or {n}")
        out[name] = v.expand(n, *v.shape[1:])
    return out


def cat(conds):
    """Concatenate encoded conditions (dicts with the same names) along the batch."""
    return {name: torch.cat([c[name] for c in conds]) for name in conds[0]}
