"""Conditions: what the U-Net is told besides x_t and t,
as one structure with one table of nulls and dropout.

A set of conditions is a plain dict, name -> value, batch first:
    raw      {"text": [B str], "level": (B,) float, "location": (B, 2) float}
             what readers, users and sample.py give
    encoded  {"text": (B, L, D) context, "level": (B,) float, "location": (B, 2) float}
             what the U-Net reads (Text2Earth.encode_conditions)
The table is ModelConfig.conditions (model/config.py): per condition the batch field(s) it comes
from, its null value ("" for the text, 0.0 = "no resolution" for the level, NaN = "no place" for a
location), its DCA dropout probability and the range its values must lie in. A condition read from
one field has one number per sample, (B,); one read from k fields (a location: "lat", "lon") has
k, (B, k). How each one enters the U-Net: "text" is the cross-attention context; the others are
embedded (UNetConfig.embedded_conditions) and added to the time embedding (the release's level).
Training drops each condition to its null independently (Text2Earth's dynamic condition
adaptation, Liu et al. 2025); guidance takes one scale per condition (model/guidance.py).
Adding a condition = its entry in the table, its embedder, its reader field(s).

`request` is the one entry from what a user or a caller gives to the raw conditions: every script,
the previews, the demo, editing and evaluation build them through it, so a new condition in the
table is read everywhere without editing them.
"""

import logging
import math
import warnings

import torch

logger = logging.getLogger(__name__)
_ABSENT = set()  # conditions whose field a batch lacked, warned about once


def width(cfg, name):
    """How many numbers condition `name` holds per sample: one per field it reads."""
    return len(cfg.conditions[name].field_names())


def null_values(cfg, name, n):
    """n rows of condition `name`'s null: (n,) for one field, (n, k) for k."""
    k = width(cfg, name)
    return torch.full((n,) if k == 1 else (n, k), float(cfg.conditions[name].null))


def check_value(cfg, name, row):
    """ValueError naming the condition and the field for a value that is not a finite number or
    lies outside the range the table gives it (ConditionConfig.bounds); `row`: one number per
    field."""
    c = cfg.conditions[name]
    for j, (field, v) in enumerate(zip(c.field_names(), row)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: {field} must be a finite number, got {v}")
        if j < len(c.bounds) and not c.bounds[j][0] <= v <= c.bounds[j][1]:
            low, high = c.bounds[j]
            raise ValueError(f"{name}: {field} {v:g} is outside [{low:g}, {high:g}]")


def request(cfg, n, text="", **values):
    """The raw conditions of n samples for the model `cfg` (a ModelConfig) describes,
    from what was given.

    text: one prompt for all, [n prompts], or encoded contexts (n or 1, L, D); values: a
    condition by name, one value for all or n values, a value one number per field (a location
    (lat, lon)); None, or a condition not given, is that condition's null, and so is None in
    place of one sample's value. A name the model does not read, or a value outside its range, is
    a ValueError naming it."""
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
            cond[name] = null_values(cfg, name, n)
        else:
            cond[name] = _rows(cfg, name, given, n)
    batch_size(cond)  # every entry has n rows, or a ValueError
    if batch_size(cond) != n:
        raise ValueError(f"conditions for {batch_size(cond)} samples, asked for {n}")
    return cond


def _rows(cfg, name, given, n):
    """A condition's values as given -> its rows, (n,) or (n, k), each checked against the
    condition's range. given: one value for all (a number; k numbers for a k-field condition) or n
    values, each a value or None (= the null, as is a value NaN in every field)."""
    k = width(cfg, name)
    if torch.is_tensor(given):
        given = given.tolist()
    if not isinstance(given, (list, tuple)) or (k > 1 and all(_number(v) for v in given)):
        given = [given]
    if len(given) == 1:
        given = list(given) * n
    null = [float(cfg.conditions[name].null)] * k
    rows = []
    for v in given:
        if v is None:
            row = null
        else:
            row = [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        if len(row) != k:
            raise ValueError(f"{name}: expected {k} numbers per sample, got {v!r}")
        if not all(math.isnan(x) for x in row):
            check_value(cfg, name, row)
        rows.append(row)
    out = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), k)
    return out[:, 0] if k == 1 else out


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    """A collated batch -> the raw conditions cfg (a ModelConfig) reads, from each condition's
    field(s). A sample without a value (a field the batch lacks, a NaN in any of the condition's
    fields) gets the condition's null: an image with no place is trained as "no location". A value
    outside the condition's range is its null too, and a warning names how many."""
    text = cfg.conditions["text"].field
    if text not in batch:
        raise ValueError(
            f"condition 'text' reads the batch field {text!r}, which the data does not have "
            f"(fields: {sorted(batch)})"
        )
    cond = {"text": list(batch[text])}
    n = len(cond["text"])
    for name in cfg.condition_names()[1:]:
        c = cfg.conditions[name]
        missing = [f for f in c.field_names() if f not in batch]
        if missing and name not in _ABSENT:
            _ABSENT.add(name)
            warnings.warn(
                f"condition {name} reads the field {', '.join(missing)}, which no sample of a "
                "batch had: read as its null there (this is said once)",
                stacklevel=2,
            )
        columns = [
            torch.as_tensor(batch[f], dtype=torch.float32).reshape(n)
            if f in batch
            else torch.full((n,), math.nan)
            for f in c.field_names()
        ]
        value = torch.stack(columns, dim=1)  # B, k
        given = value.isfinite().all(dim=1)  # B
        inside = given.clone()
        for j, (low, high) in enumerate(c.bounds or ()):
            inside &= (value[:, j] >= low) & (value[:, j] <= high)
        if bool((given & ~inside).any()):
            logger.warning(
                "condition %s: %d samples with %s outside %s, read as its null",
                name,
                int((given & ~inside).sum()),
                "/".join(c.field_names()),
                c.bounds,
            )
        value = torch.where(inside[:, None], value, null_values(cfg, name, n).reshape(n, -1))
        cond[name] = value[:, 0] if value.shape[1] == 1 else value
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
            out[name] = null_values(cfg, name, n)
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
        else:  # B, or B, k
            keep = ~dropped.reshape(-1, *[1] * (value.ndim - 1))
            out[name] = torch.where(keep, value, torch.full_like(value, float(null)))
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
