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

load_lora also reads other trainers' files, U-Net and text-encoder adapters: peft's layout
(`unet.<diffusers module>.lora_A.weight`, `.lora_B.weight`, an optional `.alpha`), the one
diffusers' LoRA training scripts write (`.lora.down.weight`, `.lora.up.weight`, alphas in the
metadata) and kohya's (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
`lora_te_` for the text encoder); export_lora_diffusers writes ours for diffusers'
`pipe.load_lora_weights`.
Shapes: r rank, I / O in / out features (channels), k kernel size.
"""

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.release import TEXT_KEYS, UNET_KEYS, WeightsError, read_tensors
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


# ----------------------------------------------------------------------------------------------
# Other trainers' files: the diffusers / peft and kohya layouts, U-Net and text encoder
# ----------------------------------------------------------------------------------------------
# diffusers / peft: '<part>.<module>.<suffix>', the module named as in diffusers' U-Net or
# transformers' CLIPTextModel (peft's own files carry no part: a U-Net's). The down (A) and up (B)
# matrices are spelt as peft spells them, or as diffusers' convert_state_dict_to_diffusers renames
# the U-Net's and the text encoder's attention projections.
PEFT_SUFFIXES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
PEFT_PARTS = ("unet", "text_encoder")
# kohya (sd-scripts: most community LoRAs, the released LCM-LoRAs): 'lora_unet_<module>.<suffix>'
# and 'lora_te_<module>.<suffix>', the module's dots written as underscores; alpha / rank scales
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# the module names of diffusers' U-Net and CLIPTextModel with an underscore of their own: they
# tell which underscores of a kohya name were dots
KOHYA_WORDS = {
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "time_emb_proj",
    "time_embedding",
    "class_embedding",
    "linear_1",
    "linear_2",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
}
# Our text tower fuses q, k, v into one in_proj_weight (3 W, W), as open_clip does: an adapter on
# CLIPTextModel's q_proj (k_proj, v_proj) is named '<attention>.in_proj.q' (.k, .v) here and
# updates the first (second, third) W rows of it (_target).
QKV_KEYS = [(r"\.self_attn\.([qkv])_proj\.", r".attn.in_proj.\1.")]
# our layer names -> diffusers' / transformers': release.UNET_KEYS and TEXT_KEYS (+ QKV_KEYS)
# backwards, for every layer an adapter can go on
UNET_NAMES = [
    (r"^time_embed\.fc(\d)\.", r"time_embedding.linear_\1."),
    (r"^cond_embed\.level\.fc(\d)\.", r"class_embedding.linear_\1."),
    (r"^(down|up)\.(\d+)\.res\.", r"\1_blocks.\2.resnets."),
    (r"^(down|up)\.(\d+)\.attn\.", r"\1_blocks.\2.attentions."),
    (r"^(down|up)\.(\d+)\.resample\.", r"\1_blocks.\2.\1samplers.0."),
    (r"^mid\.res1\.", "mid_block.resnets.0."),
    (r"^mid\.res2\.", "mid_block.resnets.1."),
    (r"^mid\.attn\.", "mid_block.attentions.0."),
    (r"\.emb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.block\.", ".transformer_blocks.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"\.to_out\.", ".to_out.0."),
]
TEXT_NAMES = [
    (r"^tower\.transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1."),
    (r"\.attn\.in_proj\.([qkv])\.", r".self_attn.\1_proj."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


class Adapter(NamedTuple):
    """One update W += (alpha / r) B A as a file holds it; `source` names it in the file."""

    A: torch.Tensor  # r, I (r, I, k, k)
    B: torch.Tensor  # O, r (O, r, 1, 1)
    alpha: float
    source: str


def _renamed(name, rules):
    """A layer name renamed by (regex, replacement) rules written for weight keys."""
    key = name + ".weight"
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key[: -len(".weight")]


def _our_name(part, module):
    """A diffusers / transformers module name -> ours, e.g. in the U-Net
        'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
        -> 'down.0.attn.0.block.attn1.to_q',
    in the text encoder
        'text_model.encoder.layers.0.self_attn.q_proj'
        -> 'tower.transformer.resblocks.0.attn.in_proj.q'."""
    return _renamed(module, UNET_KEYS if part == "unet" else TEXT_KEYS + QKV_KEYS)


def _their_name(part, name):
    """Our layer name -> the diffusers / transformers module name (_our_name backwards)."""
    return _renamed(name, UNET_NAMES if part == "unet" else TEXT_NAMES)


def _peft_key(key):
    """'unet.<module>.lora_A.weight' (any of PEFT_SUFFIXES) -> ('unet', module, 'down');
    None for a key of no such spelling."""
    suffix = next((s for s in PEFT_SUFFIXES if key.endswith("." + s)), None)
    if suffix is None:
        return None
    module = key[: -len(suffix) - 1].removeprefix("base_model.model.")
    part, _, rest = module.partition(".")
    if part in PEFT_PARTS:
        return part, rest, PEFT_SUFFIXES[suffix]
    return "unet", module, PEFT_SUFFIXES[suffix]


def _kohya_key(key):
    """'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight' ->
    ('unet', 'down_blocks.0.attentions.0.proj_in', 'down'); None for a key of no such spelling
    (SDXL's lora_te1_ / lora_te2_, LyCORIS' LoHa and LoKr, DoRA's dora_scale)."""
    name, _, suffix = key.partition(".")
    prefix = next((p for p in KOHYA_PARTS if name.startswith(p)), None)
    if prefix is None or suffix not in KOHYA_SUFFIXES:
        return None
    return KOHYA_PARTS[prefix], _kohya_module(name[len(prefix) :]), KOHYA_SUFFIXES[suffix]


def _kohya_module(flat):
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in': kohya's
    underscores back to dots, but for those inside the names of KOHYA_WORDS."""
    words, out = flat.split("_"), []
    while words:
        n = next((n for n in (3, 2) if "_".join(words[:n]) in KOHYA_WORDS), 1)
        out.append("_".join(words[:n]))
        words = words[n:]
    return ".".join(out)


def _peft_alpha(config, part, module):
    """The alpha a peft config gives `module`, None where it gives none. diffusers stores the
    config in a file's metadata as '<part>.lora_alpha' and '<part>.alpha_pattern'
    (save_lora_adapter without the part); alpha_pattern's keys match as peft matches them."""
    pattern = config.get(f"{part}.alpha_pattern", config.get("alpha_pattern")) or {}
    for key, alpha in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return alpha
    return config.get(f"{part}.lora_alpha", config.get("lora_alpha"))


def _read_layout(path, state, parse, peft_config):
    """{part: {our layer name: Adapter}} of a file in another trainer's layout: `parse` splits each
    key into (part, module, 'down' / 'up' / 'alpha'). A module without an alpha key gets the
    peft_config's alpha, or alpha = rank (diffusers' rule). A key `parse` cannot read, or a down
    matrix without its up, is an error naming it."""
    modules, unknown = {}, []
    for key in sorted(state):
        parsed = parse(key)
        if parsed is None:
            unknown.append(key)
        else:
            modules.setdefault(parsed[:2], {})[parsed[2]] = key
    if unknown:
        raise WeightsError(
            f"{path}: {len(unknown)} keys of no LoRA layout this loader reads (ours, diffusers / "
            f"peft, kohya; LoHa, LoKr, DoRA and SDXL's text encoders are not supported): "
            f"{', '.join(unknown[:6])}{', ...' if len(unknown) > 6 else ''}"
        )
    parts = {}
    for (part, module), keys in modules.items():
        missing = [role for role in ("down", "up") if role not in keys]
        if missing:
            raise WeightsError(f"{path}: {next(iter(keys.values()))} has no {missing[0]} matrix")
        A, B = state[keys["down"]], state[keys["up"]]
        if "alpha" in keys:
            alpha = state[keys["alpha"]].item()
        else:
            alpha = _peft_alpha(peft_config, part, module) or A.shape[0]
        adapter = Adapter(A, B, float(alpha), keys["down"])
        parts.setdefault(part, {})[_our_name(part, module)] = adapter
    return parts


def _read_parts(path):
    """({part: {our layer name: Adapter}}, config) of a LoRA file in any layout read_lora reads."""
    state = dict(read_tensors(path))  # a missing file: WeightsError naming it
    meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
    if meta.get("format") == FORMAT:
        cfg = {**json.loads(meta["lora"]), "part": meta.get("part", "unet")}
        names = sorted({k.rsplit(".", 1)[0] for k in state})
        alpha = float(cfg["alpha"])
        adapters = {n: Adapter(state[f"{n}.lora_A"], state[f"{n}.lora_B"], alpha, n) for n in names}
        return {cfg["part"]: adapters}, cfg
    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):  # SDXL's lora_te1_ too
        return _read_layout(path, state, _kohya_key, {}), {"format": "kohya"}
    if any(_peft_key(k) for k in state):
        peft_config = json.loads(meta.get("lora_adapter_metadata") or "{}")
        return _read_layout(path, state, _peft_key, peft_config), {"format": "diffusers/peft"}
    raise WeightsError(
        f"{path}: neither a LoRA file of ours (format '{FORMAT}') nor one in the diffusers / peft "
        f"layout ('.lora_A.weight', '.lora.down.weight' keys) or kohya's ('lora_unet_' / "
        f"'lora_te_' keys)"
    )


def read_lora(path, part=None):
    """{our layer name: Adapter (A, B, alpha, source)} of one part of the model ("unet" or
    "text_encoder") and the config of a LoRA file: ours, or in the diffusers / peft or kohya layout.
    config["parts"] lists the parts the file adapts; part=None reads the file's only part."""
    parts, cfg = _read_parts(path)
    if part is None and len(parts) > 1:
        raise WeightsError(f"{path}: adapts the {' and the '.join(parts)}: name the part to read")
    part = part or next(iter(parts))
    if part not in parts:
        raise WeightsError(f"{path}: no adapters for the {part} (it adapts the {', '.join(parts)})")
    return parts[part], {**cfg, "part": part, "parts": sorted(parts)}


def _target(layers, name):
    """The weight the adapter `name` updates, given module.named_modules(): its layer's weight, or
    for '<attention>.in_proj.q' (.k, .v) a view of the first (second, third) third of the rows of
    that attention's fused in_proj_weight; None where there is no such layer."""
    fused = re.fullmatch(r"(.*)\.in_proj\.([qkv])", name)
    if fused:
        w = getattr(layers.get(fused[1]), "in_proj_weight", None)
        return None if w is None else w.chunk(3)["qkv".index(fused[2])]
    layer = layers.get(name)
    return layer.weight if isinstance(layer, (nn.Linear, nn.Conv2d)) else None


@torch.no_grad()
def load_lora(module, path, scale=1.0, alpha=None, part=None):
    """Merge the adapters the file at `path` holds for `part` of the model (the file's only part
    when None) into `module`'s weights, times `scale` (several files add up). alpha overrides the
    file's. Every adapter must find a layer of its shape, else a WeightsError lists them. Returns
    the handle unload_lora takes."""
    adapters, _ = read_lora(path, part)
    layers = dict(module.named_modules())
    bad = []
    for name, a in adapters.items():
        w = _target(layers, name)
        where = name if a.source == name else f"{a.source} -> {name}"
        if w is None:
            bad.append(f"{where} (no such layer)")
        elif (shape := _delta(a.A, a.B).shape) != w.shape:
            bad.append(f"{where} ({tuple(shape)} vs the layer's {tuple(w.shape)})")
    if bad:
        raise WeightsError(
            f"{path}: LoRA for another architecture; {len(bad)} of {len(adapters)} adapters do not "
            f"fit: {', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}"
        )
    handle = []
    for name, a in adapters.items():
        w = _target(layers, name)
        s = scale * (alpha if alpha is not None else a.alpha) / a.A.shape[0]
        d = (s * _delta(a.A.double(), a.B.double())).to(w.dtype)
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
        w = _target(layers, name)
        w -= d.to(w.device)


def export_lora_diffusers(paths, path_out):
    """Write the adapters of the LoRA files `paths` (any layout read_lora reads; ours come one
    file a part: lora_unet.safetensors, lora_text_encoder.safetensors) as one file in the diffusers
    / peft layout ('unet.<module>.lora_A.weight', 'text_encoder.<module>.lora_B.weight'), which
    diffusers' pipe.load_lora_weights reads. Such a file holds no alpha (diffusers takes
    alpha = rank), so alpha / rank is folded into lora_B."""
    tensors = {}
    for path in paths:
        for part, adapters in _read_parts(path)[0].items():
            for name, a in adapters.items():
                module = f"{part}.{_their_name(part, name)}"
                if f"{module}.lora_A.weight" in tensors:
                    raise WeightsError(f"{path}: {module} is adapted by an earlier file too")
                tensors[f"{module}.lora_A.weight"] = a.A
                B = a.B.double() * (a.alpha / a.A.shape[0])
                tensors[f"{module}.lora_B.weight"] = B.to(a.B.dtype)
    write_tensors(path_out, tensors, {"format": "pt"})


def parse_spec(spec):
    """'path' or 'path:scale' (the --lora flag) -> (path, scale)."""
    path, sep, scale = str(spec).rpartition(":")
    try:
        return (path, float(scale)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def apply_loras(model, specs):
    """Merge every --lora 'path[:scale]' into the parts of `model` its file adapts (U-Net, text
    encoder); returns [(part, handle)]."""
    handles = []
    for spec in specs:
        path, scale = parse_spec(spec)
        for part in _read_parts(path)[0]:
            if getattr(model, part, None) is None:
                raise WeightsError(
                    f"{path}: adapts the model's {part}, which this model does not have loaded"
                )
            handles.append((part, load_lora(getattr(model, part), path, scale, part=part)))
    return handles
