"""Low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen layer W gains a trainable update (alpha / rank) * B A, A (rank, in) random, B (out, rank)
zero: at initialisation the model is exactly the base model. Adapters go on the U-Net's attention
projections by default, optionally on its feed-forward and convolution layers and on the text tower
(any nn.Linear / nn.Conv2d whose name ends with a target).

    # wraps the layers, in place; returns their names
    names = add_lora(model.unet, LoRAConfig(rank=16, alpha=16))
    # only the adapters train
    opt = AdamW(lora_parameters(model.unet))
    # the adapters alone, with their config
    save_lora(model.unet, "sar.safetensors", cfg)
    # merged into the weights for sampling
    handle = load_lora(model.unet, "sar.safetensors", scale=0.8)
    # and taken out again
    unload_lora(model.unet, handle)

load_lora also reads the diffusers / peft layout (`unet.<diffusers module>.lora_A.weight`,
`.lora_B.weight`, an optional `.alpha`), as diffusers' LoRA training scripts write it.
Shapes: r rank, I / O in / out features (channels), k kernel size.
"""

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.release import UNET_KEYS, WeightsError, read_tensors, rename_keys
from model.weights import read_metadata, write_tensors

FORMAT = "text2earth-lora"
ATTENTION = ("to_q", "to_k", "to_v", "to_out")  # every self- and cross-attention projection
FEED_FORWARD = ("ff.proj_in", "ff.proj_out")
CONVOLUTIONS = ("conv1", "conv2")  # the ResBlocks' 3x3 convolutions


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0  # the update is scaled by alpha / rank
    # layer-name suffixes: ATTENTION, + FEED_FORWARD, + CONVOLUTIONS, ...
    targets: tuple = ATTENTION
    dropout: float = 0.0  # on the adapter's input, in training


# ----------------------------------------------------------------------------------------------
# Layers with an adapter: the base layer's own parameters (same names), plus lora_A, lora_B
# ----------------------------------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) B A dropout(x); W, b are the wrapped layer's
    (shared, frozen by the caller)."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # r, I
        # O, r: starts as the base layer
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft's
        self.scale, self.merged = alpha / rank, False
        self.drop = nn.Dropout(dropout)

    def delta(self):
        return _delta(self.lora_A, self.lora_B)  # O, I

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.scale * F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B)


class LoRAConv2d(nn.Conv2d):
    """conv(x) + (alpha / r) conv_B(conv_A(dropout(x))): A a (r, I, k, k) conv with the base's
    stride and padding, B a 1x1 conv (O, r), as peft's convolution adapters."""

    def __init__(self, base: nn.Conv2d, rank, alpha, dropout=0.0):
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        nn.Module.__init__(self)
        for k in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "transposed",
            "output_padding",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, k, getattr(base, k))
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # r, I, k, k
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, **kw))  # O, r, 1, 1
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale, self.merged = alpha / rank, False
        self.drop = nn.Dropout(dropout)

    def delta(self):
        return _delta(self.lora_A, self.lora_B)  # O, I, k, k

    def forward(self, x):
        y = self._conv_forward(x, self.weight, self.bias)
        if self.merged:
            return y
        a = F.conv2d(self.drop(x), self.lora_A, None, self.stride, self.padding, self.dilation)
        return y + self.scale * F.conv2d(a, self.lora_B)


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(module, cfg: LoRAConfig):
    """Wrap every nn.Linear / nn.Conv2d of `module` whose name ends with one of cfg.targets, in
    place (state-dict names of the base layers are unchanged). Returns the wrapped layers' names; a
    target matching none is an error."""
    if cfg.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {cfg.rank}")
    found = [
        (n, m)
        for n, m in module.named_modules()
        if _matches(n, cfg.targets) and type(m) in (nn.Linear, nn.Conv2d)
    ]
    unused = [t for t in cfg.targets if not any(_matches(n, (t,)) for n, _ in found)]
    if unused:
        linears = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in module.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))
            }
        )
        raise ValueError(
            f"LoRA targets {unused} match no linear or conv layer; layer names end with: "
            f"{', '.join(linears)}"
        )
    for name, m in found:
        parent, _, child = name.rpartition(".")
        wrap = LoRALinear if isinstance(m, nn.Linear) else LoRAConv2d
        setattr(
            module.get_submodule(parent) if parent else module,
            child,
            wrap(m, cfg.rank, cfg.alpha, cfg.dropout),
        )
    return [n for n, _ in found]


def add_lora_to(model, parts, cfg: LoRAConfig):
    """add_lora on each of the model's `parts` ("unet+text_encoder", as train.py's --train) when
    cfg.rank > 0; the model back."""
    if cfg.rank < 0:
        raise ValueError(f"--lora.rank must be >= 0 (0 = no LoRA), got {cfg.rank}")
    if cfg.rank > 0:
        for part in parts.split("+"):
            add_lora(getattr(model, part), cfg)
    return model


def lora_layers(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))]


def lora_parameters(module):
    """The adapters' parameters (lora_A, lora_B of every wrapped layer):
    what a LoRA run optimises."""
    return [p for _, m in lora_layers(module) for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
def merge_lora(module):
    """Fold every live adapter into its base weight (W += scale B A):
    sampling then costs what the base model costs."""
    for _, m in lora_layers(module):
        if not m.merged:
            m.weight += m.scale * m.delta().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge_lora(module):
    """Take merged adapters out of the base weights again (W -= scale B A)."""
    for _, m in lora_layers(module):
        if m.merged:
            m.weight -= m.scale * m.delta().to(m.weight.dtype)
            m.merged = False


# ----------------------------------------------------------------------------------------------
# Files: the adapters alone
# ----------------------------------------------------------------------------------------------


def save_lora(module, path, cfg: LoRAConfig, info=None, part="unet"):
    """The adapters of `module` alone ({layer}.lora_A / .lora_B) with their config, the model part
    they belong to ("unet" or "text_encoder") and `info` in the metadata."""
    layers = lora_layers(module)
    if not layers:
        raise ValueError("save_lora: the module has no LoRA layers (add_lora first)")
    tensors = {f"{n}.{k}": getattr(m, k).detach() for n, m in layers for k in ("lora_A", "lora_B")}
    write_tensors(
        path,
        tensors,
        {
            "format": FORMAT,
            "part": part,
            "info": json.dumps(info or {}),
            "lora": json.dumps({**asdict(cfg), "targets": list(cfg.targets)}),
        },
    )


def _diffusers_name(key):
    """'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> our
    'down.0.attn.0.block.attn1.to_q'."""
    for prefix in ("unet.", "base_model.model."):
        key = key[len(prefix) :] if key.startswith(prefix) else key
    renamed, _ = rename_keys({key + ".weight": None}, UNET_KEYS)
    return next(iter(renamed))[: -len(".weight")]


def read_lora(path):
    """{our layer name: (A, B, alpha)} and the config of a LoRA file, ours or in the
    diffusers / peft layout. peft files without alphas (`.alpha` keys or a peft config in the
    metadata) get alpha = rank, as diffusers does."""
    state = dict(read_tensors(path))  # a missing file: WeightsError naming it
    meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
    if meta.get("format") == FORMAT:
        cfg = {**json.loads(meta["lora"]), "part": meta.get("part", "unet")}
        names = sorted({k.rsplit(".", 1)[0] for k in state})
        return {
            n: (state[f"{n}.lora_A"], state[f"{n}.lora_B"], float(cfg["alpha"])) for n in names
        }, cfg
    if not any(k.endswith(".lora_A.weight") for k in state):
        raise WeightsError(
            f"{path}: neither a LoRA file of ours (format '{FORMAT}') nor one with peft's "
            f"'.lora_A.weight' / '.lora_B.weight' keys"
        )
    other = sorted(k for k in state if k.split(".")[0] in ("text_encoder", "text_encoder_2"))
    if other:
        raise WeightsError(
            f"{path}: text-encoder adapters in the diffusers layout are not supported (e.g. "
            f"{other[0]})"
        )
    # diffusers may record peft's
    peft_config = json.loads(meta.get("lora_adapter_metadata") or "{}")
    config_alpha = next((v for k, v in peft_config.items() if k.endswith("lora_alpha")), None)
    out = {}
    for k in sorted(state):
        if k.endswith(".lora_A.weight"):
            base = k[: -len(".lora_A.weight")]
            A, B = state[k], state.get(base + ".lora_B.weight")
            if B is None:
                raise WeightsError(f"{path}: {k} has no {base}.lora_B.weight")
            alpha = (
                state[base + ".alpha"].item()
                if base + ".alpha" in state
                else config_alpha or A.shape[0]
            )
            out[_diffusers_name(base)] = (A, B, float(alpha))
    return out, {"format": "diffusers/peft", "part": "unet"}


@torch.no_grad()
def load_lora(module, path, scale=1.0, alpha=None):
    """Merge the adapters of the file at `path` into `module`'s weights, times `scale`
    (several files add up). alpha overrides the file's. Every adapter must find a layer of its
    shape, else a WeightsError lists them. Returns the handle unload_lora takes."""
    adapters, _ = read_lora(path)
    layers = dict(module.named_modules())
    bad = []
    for name, (A, B, _) in adapters.items():
        m = layers.get(name)
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            bad.append(f"{name} (no such layer)")
        elif (shape := _delta(A, B).shape) != m.weight.shape:
            bad.append(f"{name} ({tuple(shape)} vs the layer's {tuple(m.weight.shape)})")
    if bad:
        raise WeightsError(
            f"{path}: LoRA for another architecture; {len(bad)} of {len(adapters)} adapters do not "
            f"fit: {', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}"
        )
    handle = []
    for name, (A, B, a) in adapters.items():
        w = layers[name].weight
        d = (
            scale
            * (alpha if alpha is not None else a)
            / A.shape[0]
            * _delta(A.double(), B.double())
        ).to(w.dtype)
        w += d.to(w.device)
        handle.append((name, d))
    return handle


def _delta(A, B):
    """B A for linear (O, r) (r, I) or conv (O, r, 1, 1) (r, I, k, k) adapters."""
    return B @ A if A.ndim == 2 else torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)


@torch.no_grad()
def unload_lora(module, handle):
    """Subtract what load_lora merged (the handle it returned)."""
    layers = dict(module.named_modules())
    for name, d in handle:
        layers[name].weight -= d.to(layers[name].weight.device)


def parse_spec(spec):
    """'path' or 'path:scale' (the --lora flag) -> (path, scale)."""
    path, sep, scale = str(spec).rpartition(":")
    try:
        return (path, float(scale)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def apply_loras(model, specs):
    """Merge every --lora 'path[:scale]' into the part of `model` its file adapts;
    returns [(part, handle)]."""
    handles = []
    for spec in specs:
        path, scale = parse_spec(spec)
        _, cfg = read_lora(path)
        part = getattr(model, cfg["part"], None)
        if part is None:
            raise WeightsError(
                f"{path}: adapts the model's {cfg['part']}, which this model does not have loaded"
            )
        handles.append((cfg["part"], load_lora(part, path, scale)))
    return handles
