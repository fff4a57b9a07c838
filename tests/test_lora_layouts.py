"""LoRA files of other trainers (model/lora.py): the file diffusers' LoRA training scripts write and kohya's, U-Net and
text encoder adapters, merged into our model exactly as diffusers merges them (pipe.load_lora_weights + fuse_lora) and
predicting what diffusers' models predict; ours exported for diffusers; keys of no known layout refused by name."""

import copy
import re

import pytest
import torch
import torch.nn as nn
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import load_file, save_file

from model import lora
from model.release import UNET_KEYS, WeightsError, _import_hf_text, rename_keys
from model.weights import load_diffusers

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def layer_names(module, leave_out=()):
    """Every nn.Linear / nn.Conv2d of `module`, but those whose name starts with one of `leave_out`."""
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith(tuple(leave_out))
    ]


@pytest.fixture(scope="module")
def peft_states(tiny_release):
    """peft's state dicts of random LoRAs (B not zero) on copies of the release's U-Net (rank 4, alpha 6, on every
    linear and conv layer but the level embedding, whose kohya names diffusers' converter cannot read) and text
    encoder (rank 2, alpha 5, q, k, v, out, fc1, fc2), and their LoraConfigs."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    _, refs = tiny_release
    torch.manual_seed(4)
    targets = layer_names(refs["unet"], leave_out=("class_embedding",))
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False),
        "text_encoder": LoraConfig(
            r=2, lora_alpha=5, target_modules=TEXT_TARGETS, init_lora_weights=False
        ),
    }
    states = {}
    for part, cfg in configs.items():
        module = inject_adapter_in_model(cfg, copy.deepcopy(refs[part]))
        states[part] = {k: v.contiguous() for k, v in get_peft_model_state_dict(module).items()}
    return states, configs


@pytest.fixture
def diffusers_fused(tiny_release, monkeypatch):
    """path -> diffusers' (U-Net, text encoder), copies of the release's, after pipe.load_lora_weights(path) and
    pipe.fuse_lora(). transformers 5 asks for peft >= 0.22 in the CLIPTextModel.load_adapter that diffusers' text
    encoder loading calls; the peft 0.21 installed here has all that path uses, so that version check is lifted."""
    import transformers.integrations.peft as hf_peft
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(hf_peft, "check_peft_version", lambda min_version: None)
    _, refs = tiny_release

    def fused(path):
        pipe = StableDiffusionPipeline(
            vae=refs["vae"],
            text_encoder=copy.deepcopy(refs["text_encoder"]),
            tokenizer=None,
            unet=copy.deepcopy(refs["unet"]),
            scheduler=refs["scheduler"],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay
        return pipe.unet.eval(), pipe.text_encoder.eval()

    return fused


def differences(ours, unet, text, base):
    """Largest differences of our model with LoRAs merged from diffusers' with them fused: weights of each part (in our
    names) and outputs; and how far the LoRAs moved diffusers' weights from `base` (our model without them)."""
    theirs = {
        "unet": rename_keys(unet.state_dict(), UNET_KEYS)[0],
        "text_encoder": _import_hf_text(text.state_dict(), None, "text_encoder")[0],
    }
    out = {}
    for part, state in theirs.items():
        mine, plain = getattr(ours, part).state_dict(), getattr(base, part).state_dict()
        assert set(mine) == set(state), part
        out[f"{part} weights"] = max((mine[k] - v).abs().max().item() for k, v in state.items())
        out[f"{part} moved"] = max((plain[k] - v).abs().max().item() for k, v in state.items())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 777])
    ctx, levels = torch.randn(2, 77, 64, generator=g), torch.tensor([12.0, 18.7])
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=ctx, class_labels=levels).sample
        out["unet output"] = (
            (ours.unet(x, t, {"text": ctx, "level": levels}) - expected).abs().max().item()
        )
        expected = text(ids).last_hidden_state
        out["text output"] = (ours.text_encoder(ids) - expected).abs().max().item()
    print({k: f"{v:.2e}" for k, v in out.items()})
    return out


def check(out):
    """Merged weights as diffusers fuses them (float32 rounding), the same predictions, and LoRAs that did something."""
    assert out["unet moved"] > 0.05 and out["text_encoder moved"] > 0.05
    assert out["unet weights"] <= 1e-6 and out["text_encoder weights"] <= 1e-6
    assert out["unet output"] <= 1e-5 and out["text output"] <= 1e-5


def merged(folder, paths):
    """Our model from the release folder with the LoRA files merged as sample.py merges them (--lora)."""
    model = load_diffusers(folder).eval()
    lora.apply_loras(model, [str(p) for p in paths])
    return model


def save_diffusers_layout(states, configs, folder, spell=convert_state_dict_to_diffusers):
    """save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), ...), as
    diffusers' LoRA training scripts save, the peft configs in the metadata as they pass them (_collate_lora_metadata):
    alpha != rank, stored in the metadata alone. The file's path."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=spell(states["unet"]),
        text_encoder_lora_layers=spell(states["text_encoder"]),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_the_file_diffusers_training_scripts_write_merges_as_diffusers_merges_it(
    tiny_release, peft_states, diffusers_fused, tmp_path
):
    """The scripts' targets: the U-Net's attention projections, spelt '.lora.down.weight' / '.lora.up.weight', and the
    text encoder's, '.lora_linear_layer.down.weight' / '.up.weight'."""
    from peft import LoraConfig

    states, _ = peft_states
    attention = {
        "unet": {
            k: v for k, v in states["unet"].items() if re.search(r"\.to_(q|k|v|out\.0)\.lora_", k)
        },
        "text_encoder": {k: v for k, v in states["text_encoder"].items() if ".self_attn." in k},
    }
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=6, target_modules=["to_k", "to_q", "to_v", "to_out.0"]),
        "text_encoder": LoraConfig(r=2, lora_alpha=5, target_modules=TEXT_TARGETS[:4]),
    }
    path = save_diffusers_layout(attention, configs, tmp_path)
    keys = set(load_file(path))
    assert (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
    )
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in keys
    adapters, cfg = lora.read_lora(path, part="text_encoder")
    assert cfg["parts"] == ["text_encoder", "unet"] and cfg["format"] == "diffusers/peft"
    assert adapters["tower.transformer.resblocks.1.attn.in_proj.k"].alpha == 5.0
    folder, _ = tiny_release
    check(differences(merged(folder, [path]), *diffusers_fused(path), load_diffusers(folder)))


def test_the_diffusers_layout_on_every_layer_merges_as_diffusers_merges_it_in_peft_spelling(
    tiny_release, peft_states, diffusers_fused, tmp_path
):
    """Adapters on every layer: convert_state_dict_to_diffusers renames the attention projections' alone, and diffusers
    reads such a mixed file wrongly (load_lora_adapter converts the spelling only when the first key is not peft's, so
    the attention adapters are dropped); the reference is diffusers with the same adapters spelt as peft spells them."""
    states, configs = peft_states
    mixed = save_diffusers_layout(states, configs, tmp_path / "mixed")
    keys = set(load_file(mixed))
    assert (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
    )
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    assert "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight" in keys
    peft_spelt = save_diffusers_layout(states, configs, tmp_path / "peft", spell=dict)
    folder, _ = tiny_release
    check(
        differences(merged(folder, [mixed]), *diffusers_fused(peft_spelt), load_diffusers(folder))
    )


def kohya_file(states, path, alphas):
    """The peft state dicts written with kohya's keys: 'lora_unet_' / 'lora_te_text_model_' + the module with '_' for
    '.', lora_down / lora_up, and an alpha for each module (`alphas` of the part; alpha != rank). The kohya names."""
    tensors = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for key, value in states[part].items():
            module, _, matrix = key.rpartition(".lora_")
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_{'down' if matrix == 'A.weight' else 'up'}.weight"] = value
            tensors[f"{name}.alpha"] = torch.tensor(alphas[part])
    save_file(tensors, path)
    return {k.split(".")[0] for k in tensors}


def test_the_kohya_layout_merges_as_diffusers_merges_it(
    tiny_release, peft_states, diffusers_fused, tmp_path
):
    """Every layer but the level embedding (class_embedding: diffusers' kohya converter cannot name it); one alpha a part
    (diffusers drops per-module alphas of attention projections and of the text encoder: its alpha_pattern keys do not
    match), then a per-module alpha checked against kohya's rule, W += alpha / rank B A for that module alone."""
    folder, _ = tiny_release
    path = tmp_path / "kohya.safetensors"
    names = kohya_file(peft_states[0], path, {"unet": 3.0, "text_encoder": 1.0})
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert {"lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_time_embedding_linear_1"} <= names
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj" in names
    adapters, cfg = lora.read_lora(path, part="unet")
    assert (
        cfg["format"] == "kohya"
        and len(adapters) == len(layer_names(load_diffusers(folder).unet)) - 2
    )
    ours = merged(folder, [path])
    check(differences(ours, *diffusers_fused(path), load_diffusers(folder)))
    # kohya's rule is per module: twice the alpha of one U-Net layer and of the text encoder's first k, twice their update
    tensors = load_file(path)
    for name in (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj",
    ):
        tensors[f"{name}.alpha"] *= 2
    save_file(tensors, tmp_path / "alphas.safetensors")
    twice = merged(folder, [tmp_path / "alphas.safetensors"]).state_dict()
    once, base = ours.state_dict(), load_diffusers(folder).state_dict()
    expected = dict(once)
    for k, rows in (
        ("unet.mid.attn.block.attn1.to_v.weight", slice(None)),
        (
            "text_encoder.tower.transformer.resblocks.0.attn.in_proj_weight",
            slice(64, 128),
        ),  # k's third
    ):
        expected[k] = once[k].clone()
        expected[k][rows] += once[k][rows] - base[k][rows]
    assert max((twice[k] - v).abs().max().item() for k, v in expected.items()) <= 1e-6


def randomize_b(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(module):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def test_our_adapters_exported_load_in_diffusers_with_the_same_merged_weights(
    tiny_release, diffusers_fused, tmp_path
):
    """Ours, as train.py writes them (lora_unet.safetensors: every layer of the U-Net, alpha 2, rank 4;
    lora_text_encoder.safetensors: out_proj, c_fc, c_proj, alpha 3, rank 2), exported as one diffusers file."""
    folder, _ = tiny_release
    model = load_diffusers(folder)
    paths = []
    for part, cfg in (
        ("unet", lora.LoRAConfig(rank=4, alpha=2, targets=tuple(layer_names(model.unet)))),
        ("text_encoder", lora.LoRAConfig(rank=2, alpha=3, targets=("out_proj", "c_fc", "c_proj"))),
    ):
        lora.add_lora(getattr(model, part), cfg)
        randomize_b(getattr(model, part), seed=len(paths))
        paths.append(tmp_path / f"lora_{part}.safetensors")
        lora.save_lora(getattr(model, part), paths[-1], cfg, part=part)
    exported = tmp_path / "pytorch_lora_weights.safetensors"
    lora.export_lora_diffusers(paths, exported)
    keys = set(load_file(exported))
    assert "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in keys
    ours = merged(folder, paths)
    check(differences(ours, *diffusers_fused(exported), load_diffusers(folder)))
    again = merged(folder, [exported]).state_dict()
    assert max((v - again[k]).abs().max().item() for k, v in ours.state_dict().items()) <= 1e-6


def test_keys_of_no_known_layout_are_refused_by_name(tiny_release, tmp_path):
    unet = load_diffusers(tiny_release[0]).unet
    pair = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2),
    }
    for extra in (
        "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale",  # DoRA
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",  # SDXL's second text encoder
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a",  # LyCORIS' LoHa
    ):
        save_file({**pair, extra: torch.zeros(2)}, tmp_path / "a.safetensors")
        with pytest.raises(
            WeightsError, match=r"1 keys of no LoRA layout this loader reads .*: " + extra
        ):
            lora.load_lora(unet, tmp_path / "a.safetensors")
    save_file(
        {**pair, "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(32)},
        tmp_path / "b.safetensors",
    )
    with pytest.raises(WeightsError, match="layout"):  # kohya's layout, with a peft key
        lora.load_lora(unet, tmp_path / "b.safetensors")
    save_file(
        {
            "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 64),
            "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(64),
        },
        tmp_path / "c.safetensors",
    )
    with pytest.raises(
        WeightsError,
        match=r"no LoRA layout .*: unet\.mid_block\.attentions\.0\.proj_in\.lora_magnitude_vector",
    ):
        lora.load_lora(unet, tmp_path / "c.safetensors")
    save_file(
        {"unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 2)},
        tmp_path / "d.safetensors",
    )
    with pytest.raises(
        WeightsError,
        match=r"unet\.mid_block\.attentions\.0\.proj_in\.lora_B\.weight has no down matrix",
    ):
        lora.load_lora(unet, tmp_path / "d.safetensors")
    save_file(
        {
            **pair,
            "lora_unet_down_blocks_0_attentions_0_to_qq.lora_down.weight": torch.zeros(2, 32),
            "lora_unet_down_blocks_0_attentions_0_to_qq.lora_up.weight": torch.zeros(32, 2),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(256, 2),
        },
        tmp_path / "e.safetensors",
    )
    with pytest.raises(WeightsError, match="adapts the text_encoder and the unet: name the part"):
        lora.load_lora(unet, tmp_path / "e.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"1 of 2 adapters do not fit: lora_unet_down_blocks_0_attentions_0_to_qq\.lora_down\.weight -> "
        r"down\.0\.attn\.0\.to\.qq \(no such layer\)",
    ):
        lora.load_lora(unet, tmp_path / "e.safetensors", part="unet")
