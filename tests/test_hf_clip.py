"""Hugging Face CLIP / SigLIP folders (evaluation/hf_clip.py) against transformers itself.

Tiny random CLIPModel and SiglipModel folders are written with transformers' save_pretrained, with
a tokenizer (CLIP's BPE from open_clip's vocabulary; a sentencepiece model trained here for SigLIP)
and a preprocessor_config.json (clip-rsicd-v2's old feature-extractor format for CLIP). Our
embeddings must equal transformers' get_image_features / get_text_features on its processor's
output for uint8 PIL images, and clip_dot_score a transcription of Txt2Img-MHN's clip_score.py
loop, to 1e-5 relative.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from evaluation import hf_clip  # noqa: E402
from evaluation.clip import HF, clip_score, parse_spec  # noqa: E402
from evaluation.metrics import clip_mmd  # noqa: E402
from model.release import WeightsError  # noqa: E402
from release import write_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "many buildings and green trees are around a playground",
    "a bridge is over a river with some boats",
    "several storage tanks are near a road",
    "an airport with two runways and many planes",
    "dense residential area with red roofs",
]
SIGLIP_SIZE = 32


def _randomize(model, seed):
    """Fan-in scaled random weights (transformers' init is too small to separate inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif p.ndim == 1:
                p.copy_(1 + 0.1 * noise if "norm" in name and "weight" in name else 0.1 * noise)
    return model.eval()


def _images(sizes, seed=0):
    """uint8 RGB arrays (H, W, 3) of the given sizes: smooth gradients plus noise."""
    g = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([yy, xx, (yy + xx) / 2], -1) * g.uniform(100, 255, 3)
        out.append(np.clip(base + g.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def _signed(u8):
    """(H, W, 3) uint8 -> (3, H, W) in [-1, 1], as evaluation/testset.read_image reads a file."""
    return torch.from_numpy(u8).permute(2, 0, 1).float() / 127.5 - 1


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _unit(e):
    e = e.double()
    return e / e.norm(dim=1, keepdim=True)


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIPModel at 224 px, saved as clip-rsicd-v2 is: old CLIPFeatureExtractor config."""
    folder = tmp_path_factory.mktemp("clip")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
        ),
        projection_dim=16,
    )
    _randomize(transformers.CLIPModel(cfg), 0).save_pretrained(folder)
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": 224,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "size": 224,
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """A tiny SiglipModel with a sentencepiece tokenizer trained here, square 32 px input."""
    spm = pytest.importorskip("sentencepiece", reason="SigLIP's tokenizer needs sentencepiece")
    folder = tmp_path_factory.mktemp("siglip")
    buf = io.BytesIO()
    words = " ".join(CAPTIONS).split()
    corpus = [" ".join(words[i : i + 6]) for i in range(0, len(words), 3)] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=80,
        model_type="unigram",
        hard_vocab_limit=False,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tok = transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    tok.save_pretrained(folder)
    cfg = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            image_size=SIGLIP_SIZE,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
        ),
    )
    _randomize(transformers.SiglipModel(cfg), 1).save_pretrained(folder)
    transformers.SiglipImageProcessor(
        size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}, resample=3
    ).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# CLIP score and CMMD embeddings
# ----------------------------------------------------------------------------------------------


def test_clip_images_and_texts_equal_transformers(clip_folder):
    clip = hf_clip.load_hf_clip(clip_folder)
    assert clip.kind == "clip" and clip.image.resize == 224 and clip.image.crop == (224, 224)
    arrays = _images([(256, 256), (300, 260), (180, 200), (224, 224)])
    ours_px = hf_clip.pixel_values(
        clip.image, [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    )
    processor = transformers.CLIPProcessor.from_pretrained(clip_folder)
    ref = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt").pixel_values
    torch.testing.assert_close(ours_px, ref, rtol=0, atol=1e-5)

    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        ref_img = _unit(_features(model.get_image_features(pixel_values=ref)))
        t = processor(text=CAPTIONS, padding=True, return_tensors="pt")
        ref_txt = _unit(_features(model.get_text_features(**t)))
    img = hf_clip.image_embeddings(clip, [[_signed(a) for a in arrays]])
    txt = hf_clip.text_embeddings(clip, CAPTIONS, batch_size=2)
    assert img.dtype == txt.dtype == torch.float64 and img.shape == (4, 16)
    assert _rel(img, ref_img) < 1e-5 and _rel(txt, ref_txt) < 1e-5
    assert (img - img[0]).abs().max() > 1e-3  # the random model tells the images apart

    # a caption beyond 77 tokens is cut as the tokenizer's truncation cuts it
    long = " ".join(CAPTIONS * 4)
    with torch.no_grad():
        t = processor(text=[long], truncation=True, return_tensors="pt")
        ref_long = _unit(_features(model.get_text_features(**t)))
    assert t["input_ids"].shape[1] == 77
    assert _rel(hf_clip.text_embeddings(clip, [long]), ref_long) < 1e-5


def test_embeddings_feed_clip_score_and_cmmd(clip_folder):
    clip = hf_clip.load_hf_clip(clip_folder)
    arrays = _images([(224, 224)] * 5, seed=3)
    batch = torch.stack([_signed(a) for a in arrays])
    img = hf_clip.image_embeddings(clip, batch, batch_size=2)  # a tensor in batches
    txt = hf_clip.text_embeddings(clip, CAPTIONS)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(5, dtype=torch.float64))
    cos = (img * txt).sum(1)
    assert clip_score(img, txt) == pytest.approx(100 * cos.clamp_min(0).mean().item(), rel=1e-12)
    assert clip_mmd(img, img) == pytest.approx(0, abs=1e-9)
    assert clip_mmd(img[:3], img[3:]) > 0


def test_siglip_images_and_texts_equal_transformers(siglip_folder):
    clip = hf_clip.load_hf_clip(siglip_folder)
    assert clip.kind == "siglip" and clip.text_length == 64 and clip.image.crop is None
    assert clip.image.resize == (SIGLIP_SIZE, SIGLIP_SIZE)
    arrays = _images([(64, 80), (48, 48), (100, 60)], seed=1)
    processor = transformers.SiglipProcessor.from_pretrained(siglip_folder)
    model = transformers.SiglipModel.from_pretrained(siglip_folder).eval()
    px = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt").pixel_values
    # the model card's usage: padding="max_length" (64 tokens), the ids alone, as SigLIP was trained
    ids = processor(text=CAPTIONS, padding="max_length", return_tensors="pt")["input_ids"]
    assert ids.shape == (5, 64)
    with torch.no_grad():
        ref_img = _unit(_features(model.get_image_features(pixel_values=px)))
        ref_txt = _unit(_features(model.get_text_features(input_ids=ids)))
    img = hf_clip.image_embeddings(clip, [[_signed(a) for a in arrays]])
    txt = hf_clip.text_embeddings(clip, CAPTIONS)
    assert _rel(img, ref_img) < 1e-5 and _rel(txt, ref_txt) < 1e-5
    assert (txt - txt[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Txt2Img-MHN's CLIP score
# ----------------------------------------------------------------------------------------------


def _their_clip_score(folder, gen_dir, txt_dir, names):
    """Txt2Img-MHN's clip_score.py and CLIP_GenTextImageDataset, transcribed: DataLoader of batch 1,
    CLIPProcessor on the [0, 1] float tensor, projected features, (img @ txt.T).max() / 100, mean.
    The processor is transformers 4.27's: the float image to PIL by * 255 and astype(uint8), then
    PIL resize, crop, / 255, normalise, which is the PIL image processor of today on that PIL image.
    """
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_transform = T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize(256),
            T.ToTensor(),
        ]
    )
    files = [
        {"img": gen_dir / f"{name}_{i}.png", "text": txt_dir / f"{name}.txt"}
        for name in names
        for i in range(10)
    ]

    def item(d):
        descriptions = [t for t in Path(d["text"]).read_text().split("\n") if len(t) > 0]
        return descriptions[0], image_transform(Image.open(d["img"]))

    test_loader = DataLoader([item(d) for d in files], batch_size=1, shuffle=False)
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = transformers.CLIPProcessor.from_pretrained(folder)
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    sim_avg = 0.0
    with torch.no_grad():
        for index, (text, images) in enumerate(test_loader):
            pil = [
                Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                for im in images
            ]
            image_inputs = processor(images=pil, return_tensors="pt").pixel_values
            # (a tuple of one caption from the DataLoader; transformers 5 wants a list)
            text_inputs = tokenizer(text=list(text), return_tensors="pt").input_ids
            image_embeddings = _features(model.get_image_features(image_inputs))
            text_embeddings = _features(model.get_text_features(text_inputs))
            sim_avg += (image_embeddings @ text_embeddings.T).max().item() / 100.0
    return sim_avg / (index + 1)


def test_clip_dot_score_equals_their_loop(clip_folder, tmp_path):
    gen, txt = tmp_path / "gen", tmp_path / "txt"
    gen.mkdir(), txt.mkdir()
    names = ["airport_1", "bridge_7", "00012"]
    sizes = [(256, 256)] * 10 + [(300, 260)] * 10 + [(256, 256)] * 8 + [(250, 270), (256, 256)]
    arrays = _images(sizes, seed=2)
    paths, captions = [], []
    for j, name in enumerate(names):
        (txt / f"{name}.txt").write_text(f"\n{CAPTIONS[j]}\n{CAPTIONS[j + 1]}\n")
        for i in range(10):
            a = arrays[10 * j + i]
            im = Image.fromarray(a[..., 0], "L") if (j, i) == (2, 3) else Image.fromarray(a)
            im.save(gen / f"{name}_{i}.png")
            paths.append(gen / f"{name}_{i}.png")
            captions.append(CAPTIONS[j])
    clip = hf_clip.load_hf_clip(clip_folder)
    ours = hf_clip.clip_dot_score(clip, paths, captions, batch_size=7)
    theirs = _their_clip_score(clip_folder, gen, txt, names)
    assert ours == pytest.approx(100 * theirs, rel=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        hf_clip.clip_dot_score(clip, paths, captions[:-1])


def test_mhn_pixels_read_the_image_at_full_scale(clip_folder):
    """The chosen reading (transformers 4.27): the image's own values, not 1/255 of them as
    transformers >= 4.28 makes of [0, 1] floats."""
    s = hf_clip.load_hf_clip(clip_folder).image
    a = _images([(256, 256)], seed=4)[0]
    x = hf_clip.mhn_pixels(Image.fromarray(a), s)
    raw = x * torch.tensor(s.std)[:, None, None] + torch.tensor(s.mean)[:, None, None]
    assert x.shape == (3, 224, 224) and raw.min() > -1e-4 and raw.max() > 0.9
    twice = transformers.CLIPImageProcessor.from_pretrained(clip_folder)(
        images=torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255, return_tensors="pt"
    ).pixel_values[0]
    raw_twice = twice * torch.tensor(s.std)[:, None, None] + torch.tensor(s.mean)[:, None, None]
    assert raw_twice.abs().max() < 0.01  # about 1/255: what their loop reads under transformers 5


# ----------------------------------------------------------------------------------------------
# The --clip spec, folders, errors
# ----------------------------------------------------------------------------------------------


def test_spec_names_open_clip_files_and_hf_folders(clip_folder):
    assert parse_spec("ViT-B-32:RemoteCLIP-ViT-B-32.pt") == (
        "ViT-B-32",
        Path("RemoteCLIP-ViT-B-32.pt"),
    )
    assert parse_spec(f"hf:{clip_folder}") == (HF, clip_folder)
    assert parse_spec(str(clip_folder)) == (HF, clip_folder)  # a folder holding config.json
    with pytest.raises(ValueError, match="hf:FOLDER"):
        parse_spec("RemoteCLIP-ViT-B-32.pt")
    with pytest.raises(ValueError, match="hf:FOLDER"):
        parse_spec("hf:")


def test_folder_errors_name_the_problem(tmp_path, clip_folder, monkeypatch):
    with pytest.raises(WeightsError, match="no such folder"):
        hf_clip.load_hf_clip(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        WeightsError, match="config.json, preprocessor_config.json, model.safetensors"
    ):
        hf_clip.check_folder(empty)
    other = tmp_path / "bert"
    other.mkdir()
    for f in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (other / f).write_text((clip_folder / f).read_text() if f.endswith("json") else "")
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(WeightsError, match="model_type 'bert'"):
        hf_clip.check_folder(other)
    assert hf_clip.check_folder(clip_folder) == "clip"
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install transformers"):
        hf_clip.load_hf_clip(clip_folder)


def test_transformers_models_import_beside_our_packages():
    """`python evaluate.py` runs with the repository root first on sys.path and our packages
    imported: transformers' models (from 5.25 they import its dependency `kernels`) must import
    there too."""
    code = (
        "import model.attention, evaluation.hf_clip\n"
        "from transformers import CLIPModel, SiglipModel\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("protocol", ["ours", "mhn"])
def test_evaluate_reads_a_hugging_face_folder(tiny_ckpt, clip_folder, tmp_path, capsys, protocol):
    """evaluate.py --clip hf:FOLDER: the cosine score and CMMD under our protocol, their dot score
    (equal to clip_dot_score on the generated files and captions) under --protocol mhn."""
    import evaluate

    out = tmp_path / protocol
    args = ["--weights", str(tiny_ckpt), "--test", "procedural:3", "--size", "32", "32", "--n", "2",
            "--steps", "2", "--out", str(out), "--clip", f"hf:{clip_folder}", "--protocol", protocol,
            "--cls-size", "32", "--cls-epochs", "1"]  # fmt: skip
    assert evaluate.main(args) == 0, capsys.readouterr().err
    m = json.loads((out / "report.json").read_text())["metrics"]
    if protocol == "ours":
        assert -100 <= m["clip_score"]["value"] <= 100 and "cmmd" in m
        return
    assert "cmmd" not in m and "Txt2Img-MHN" in m["clip_score"]["implementation"]
    files = sorted((out / "generated").glob("*.png"))  # each with its own caption: order is free
    captions = [Image.open(f).text["prompt"].split(" .")[0] for f in files]
    want = hf_clip.clip_dot_score(hf_clip.load_hf_clip(clip_folder), files, captions)
    assert m["clip_score"]["value"] == pytest.approx(want, rel=1e-6)
