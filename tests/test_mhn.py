"""Txt2Img-MHN's evaluation protocol (evaluation/mhn.py) against a transcription of their released
code (github YonghaoXu/Txt2Img-MHN: is_fid_score/is_fid_score.py, pretrain_inception.py,
zero_shot_classification/), rewritten here around torchvision's networks with random weights."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy import linalg
from scipy.stats import entropy
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from evaluation import mhn
from evaluation.metrics import frechet_distance as frechet_eigh
from evaluation.testset import karpathy
from model.release import WeightsError
from model.weights import read_metadata

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def write_images(folder, names, size=224, seed=0, tint=None):
    """Random RGB JPEG/PNG files (224 px like RSICD's); `tint` {class: rgb} biases each class's
    colour so that a classifier has something to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    files = []
    for n in names:
        x = g.integers(0, 256, (size, size, 3)).astype(np.float64)
        if tint:
            x = 0.4 * x + 0.6 * np.array(tint[n.split("_")[0]], dtype=np.float64)
        f = folder / n
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(f)
        files.append(f)
    return files


# ----------------------------------------------------------------------------------------------
# Their code, transcribed (torchvision's networks stand in for their copies of them)
# ----------------------------------------------------------------------------------------------
class TheirDataset(Dataset):
    def __init__(self, files, labels=None, size=256):
        self.files, self.labels = files, labels
        self.transform = transforms.Compose(
            [
                transforms.Resize(size=(size, size)),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def __getitem__(self, i):
        img = self.transform(Image.open(self.files[i]).convert("RGB"))
        return img if self.labels is None else (img, self.labels[i])

    def __len__(self):
        return len(self.files)


def their_score_model(state):
    """ScoreModel.__init__: Inception-v3 without aux logits, a 30-class fc, the saved weights
    loaded position by position, eval, the fc split off and replaced by an empty Sequential."""
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    model.fc = torch.nn.Linear(model.fc.in_features, 30)
    new = model.state_dict().copy()
    for i, j in zip(state, new):
        new[j] = state[i]
    model.load_state_dict(new)
    model.eval()
    fc = model.fc
    model.fc = torch.nn.Sequential()
    return model, fc


def their_iter(model, fc, files, batch_size=4):
    """get_score_image_iter: pool3 features and 30-class softmax in float64 arrays."""
    loader = DataLoader(TheirDataset(files), batch_size=batch_size)
    pool3, preds = np.zeros((len(files), 2048)), np.zeros((len(files), 30))
    with torch.no_grad():
        for i, batch in enumerate(loader):
            x = model(batch)
            pool3[i * batch_size : i * batch_size + len(batch)] = x.numpy()
            preds[i * batch_size : i * batch_size + len(batch)] = torch.softmax(fc(x), 1).numpy()
    return pool3, preds


def their_is(preds):
    py = np.mean(preds, axis=0)
    return np.exp(np.mean([entropy(preds[i], py) for i in range(len(preds))]))


def their_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def their_zero_shot(init_file, train, test, size, epochs, batch_size, seed):
    """zero_shot_evaluation.main + tools.utils.test_acc, the shuffle drawn from a seeded
    generator instead of the global RNG."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(init_file, weights_only=True))
    model.fc = torch.nn.Linear(model.fc.in_features, 30)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(
        TheirDataset(*train, size=size),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for x, y in loader:
            model.train()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    model.eval()
    correct, total = [0.0] * 30, [0.0] * 30
    with torch.no_grad():
        for x, y in DataLoader(TheirDataset(*test, size=size), batch_size=batch_size):
            pred = model(x).argmax(1)
            for label, right in zip(y.tolist(), (pred == y).tolist()):
                correct[label] += right
                total[label] += 1
    present = [k for k in range(30) if total[k]]
    oa = sum(correct) / sum(total)
    return oa, float(np.mean([correct[k] / total[k] for k in present]))


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random Inception-v3 with a 30-class fc, saved as their pretrain_inception.py saved it
    (a DataParallel state dict: keys prefixed "module.")."""
    torch.manual_seed(0)
    net = mhn.inception()
    for m in net.modules():  # BatchNorm statistics of real activations, not a collapsed net
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 128, 128))
    path = tmp_path_factory.mktemp("inception") / "epoch_10_OA_9000.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path


def test_features_is_and_fid_equal_their_code(tmp_path, inception_file):
    tint = {"airport": (200, 180, 160), "beach": (40, 90, 200)}
    gen = write_images(tmp_path / "gen", [f"airport_{i}_0.png" for i in range(6)], 256, 0, tint)
    real = write_images(tmp_path / "real", [f"beach_{i}.jpg" for i in range(5)], 224, 1, tint)
    ours = mhn.load_inception(inception_file)
    assert not ours.transform_input
    f_gen, p_gen = mhn.inception_outputs(ours, gen, batch_size=4)
    f_real, _ = mhn.inception_outputs(ours, real, batch_size=3)
    model, fc = their_score_model(torch.load(inception_file, weights_only=True))
    t_gen, q_gen = their_iter(model, fc, gen)
    t_real, _ = their_iter(model, fc, real)
    assert f_gen.shape == (6, 2048) and p_gen.shape == (6, 30)
    assert rel(f_gen, t_gen) < 1e-5 and rel(f_real, t_real) < 1e-5
    assert rel(p_gen, q_gen) < 1e-5
    assert abs(mhn.inception_score(p_gen) - their_is(q_gen)) / their_is(q_gen) < 1e-5
    d = 256  # of the 2048 dimensions: scipy's sqrtm of a 2048 x 2048 product takes ~10 s a call
    theirs = their_fid(*mhn.stats(t_gen[:, :d]), *mhn.stats(t_real[:, :d]))
    fid, route = mhn.frechet_distance(*mhn.stats(f_gen[:, :d]), *mhn.stats(f_real[:, :d]))
    assert route.startswith("scipy sqrtm")
    assert theirs > 1 and abs(fid - theirs) / abs(theirs) < 1e-5


def test_frechet_routes_agree_when_well_conditioned():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(400, 12)), g.normal(0.3, 1.2, size=(400, 12))
    fid, route = mhn.frechet_distance(*mhn.stats(a), *mhn.stats(b))
    assert route == "scipy sqrtm"
    assert abs(fid - their_fid(*mhn.stats(a), *mhn.stats(b))) <= 1e-9 * fid
    assert abs(fid - frechet_eigh(*mhn.stats(a), *mhn.stats(b))) < 1e-6 * fid
    assert abs(mhn.frechet_distance(*mhn.stats(a), *mhn.stats(a))[0]) < 1e-6


def test_inception_score_bounds():
    assert mhn.inception_score(np.full((10, 30), 1 / 30)) == pytest.approx(1.0)
    assert mhn.inception_score(np.eye(30)) == pytest.approx(30.0, rel=1e-9)


def test_zero_shot_loop_equals_their_code(tmp_path):
    classes = ("airport", "park", "parking")
    tint = {"airport": (200, 200, 200), "park": (30, 160, 40), "parking": (90, 90, 160)}
    gen_names = [f"{c}_{i}_{k}.png" for c in classes for i in range(3) for k in range(2)]
    gen = write_images(tmp_path / "gen", gen_names, size=48, tint=tint)
    real = write_images(
        tmp_path / "real", [f"{c}_{i}.jpg" for c in classes for i in range(4)], 40, 1, tint
    )
    gen_labels = [mhn.class_index(f.name.rsplit("_", 1)[0]) for f in gen]
    real_labels = [mhn.class_index(f.name) for f in real]
    assert sorted(set(real_labels)) == [0, 16, 17]  # 'parking' 16, 'park' 17
    torch.manual_seed(3)
    init = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), init)
    kw = dict(size=64, epochs=2, batch_size=5, seed=7)
    ours = mhn.zero_shot(gen, gen_labels, real, real_labels, init=str(init), **kw)
    oa, aa = their_zero_shot(init, (gen, gen_labels), (real, real_labels), **kw)
    assert ours["n_train"] == 18 and ours["n_test"] == 12
    assert abs(ours["oa"] - oa) < 1e-9 and abs(ours["aa"] - aa) < 1e-9
    assert set(ours["per_class"]) == set(classes)
    assert ours["init"] == f"ImageNet from {init.name}"


def test_fit_inception_round_trip(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "inception_v3_google.pth"
    torch.save(torchvision.models.inception_v3(weights=None, init_weights=False).state_dict(), init)
    files = write_images(
        tmp_path / "train", [f"{c}_{i}.jpg" for c in ("port", "river") for i in range(2)], 96
    )
    labels = [mhn.class_index(f.name) for f in files]
    net = mhn.fit_inception(files, labels, init, epochs=1, batch_size=3, seed=0)
    assert not net.transform_input and not net.training
    mhn.save_inception(net, tmp_path / "mhn.safetensors", {"epochs": 1})
    back = mhn.load_inception(tmp_path / "mhn.safetensors")
    a, _ = mhn.inception_outputs(net, files[:2])
    b, _ = mhn.inception_outputs(back, files[:2])
    assert np.array_equal(a, b)


def test_load_errors(tmp_path):
    with pytest.raises(WeightsError, match="never released"):
        mhn.load_inception(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="fc.weight"):
        mhn.load_inception(tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="inception_v3_google"):
        mhn.imagenet_inception(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------
# Images, captions, lists, the RSICD test set
# ----------------------------------------------------------------------------------------------
def test_stretch_equals_save_image(tmp_path):
    x = torch.randn(3, 8, 8) * 0.3
    torchvision.utils.save_image(x, tmp_path / "a.png", normalize=True)
    theirs = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1)
    assert torch.equal(mhn.stretch(x), theirs)


def test_caption_and_lists(tmp_path):
    assert mhn.caption("many buildings are near a river .") == "many buildings are near a river"
    assert mhn.caption("a bustling block . no end") == "a bustling block"
    write_images(tmp_path, ["beach_1.jpg", "river_2.jpg"], size=8)
    lst = tmp_path / "RSICD_test.txt"
    lst.write_text("beach/beach_1.jpg 19\nriver/river_2.jpg 13\n")
    assert [f.name for f in mhn.read_list(lst, tmp_path)] == ["beach_1.jpg", "river_2.jpg"]
    lst.write_text("beach/beach_1.jpg 19\nport/port_9.jpg 3\n")
    with pytest.raises(ValueError, match="1 of its 2 images are not in"):
        mhn.read_list(lst, tmp_path)
    files = [f"f{i}" for i in range(30)]
    drawn = mhn.draw(files, 10)
    assert (
        len(drawn) == 10
        and drawn == mhn.draw(files, 10)
        and drawn == sorted(drawn, key=files.index)
    )


def test_rsicd_splits_as_theirs(tmp_path):
    """A json named like RSICD's: 10921 images, 8734 train, 1094 val + 1093 test of which 133 have
    numeric names; the protocol's test set is every image not in train (2187), 2054 named."""
    g = np.random.default_rng(0)
    splits = ["train"] * 8734 + ["val"] * 1094 + ["test"] * 1093
    numeric = set((8734 + g.choice(2187, 133, replace=False)).tolist()) | {5, 17}
    images = []
    for i, split in enumerate(splits):
        name = f"{i:05d}.jpg" if i in numeric else f"{mhn.CLASSES[i % 30]}_{i}.jpg"
        images.append({"filename": name, "split": split, "sentences": [{"raw": f"scene {i} ."}]})
    path = tmp_path / "dataset_rsicd.json"
    path.write_text(json.dumps({"images": images}))
    test = karpathy(path, mhn.NOT_TRAIN)
    assert len(karpathy(path, "train")) == 8734 and len(test) == 2187
    named = [im for im in test if mhn.class_index(im.path.name) is not None]
    assert len(named) == 2054
    assert {mhn.class_index(im.path.name) for im in named} == set(range(30))
    assert mhn.class_index("parking_3.jpg") == 16 and mhn.class_index("park_3.jpg") == 17
    assert mhn.class_index("00744.jpg") is None


# ----------------------------------------------------------------------------------------------
# evaluate.py --protocol mhn
# ----------------------------------------------------------------------------------------------
def run_evaluate(args, capsys):
    import evaluate

    try:
        code = evaluate.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    text = capsys.readouterr()
    return code, text.out + text.err


@pytest.fixture(scope="module")
def rsicd_like(tmp_path_factory):
    """A Karpathy json in RSICD's naming: 4 train images (2 classes), a val and a test split of 3
    classes plus one numeric name; random networks as their ImageNet files."""
    d = tmp_path_factory.mktemp("rsicd")
    tint = {"airport": (200, 200, 200), "forest": (30, 120, 40), "port": (40, 60, 160)}
    names = {
        "train": ["airport_1.jpg", "airport_2.jpg", "forest_1.jpg", "forest_2.jpg"],
        "val": ["airport_3.jpg", "forest_3.jpg"],
        "test": ["port_4.jpg", "forest_4.jpg", "00007.jpg"],
    }
    images = []
    for split, files in names.items():
        for f in files:
            t = {**tint, "00007.jpg": (120, 120, 120)}
            write_images(
                d / "images", [f], size=64, tint={f.split("_")[0]: t.get(f, t.get(f.split("_")[0]))}
            )
            images.append(
                {"filename": f, "split": split, "sentences": [{"raw": f"a view of {f[:-4]} ."}]}
            )
    (d / "dataset_rsicd.json").write_text(json.dumps({"images": images}))
    torch.manual_seed(0)
    torch.save(
        torchvision.models.inception_v3(weights=None, init_weights=False).state_dict(),
        d / "inception.pth",
    )
    torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pth")
    return d


def test_evaluate_protocol_mhn_end_to_end(tiny_ckpt, rsicd_like, tmp_path, capsys):
    d, out = rsicd_like, tmp_path / "eval"
    args = [
        "--weights", tiny_ckpt, "--test", d / "dataset_rsicd.json", "--protocol", "mhn", "--level", 17,
        "--size", 32, 32, "--n", 2, "--steps", 2, "--out", out, "--stretch",
        "--fit-mhn-inception", d / "inception.pth", "--mhn-epochs", 1,
        "--resnet-init", d / "resnet18.pth", "--cls-size", 64, "--cls-epochs", 1,
    ]  # fmt: skip
    code, text = run_evaluate(args, capsys)
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert report["protocol"] == "mhn" and report["split"] == mhn.NOT_TRAIN
    assert report["n_test"] == 5 and report["n_generated"] == 10  # val + test, the numeric one too
    assert m["fid"]["n_real"] == 5 and m["fid"]["n_fake"] == 10 and np.isfinite(m["fid"]["value"])
    assert 1 <= m["is"]["value"] <= 30 and "Txt2Img-MHN" in m["fid"]["implementation"]
    assert m["cls_oa"]["n_test"] == 4 and m["cls_oa"]["n_train"] == 8  # 00007 has no class
    assert "clip" in report["skipped"]
    dev = " ".join(report["deviations"])
    assert "2 images per test image" in dev and "drawn here" in dev and "fine-tuned here" in dev
    md = (out / "report.md").read_text()
    assert "Protocol: Txt2Img-MHN's" in md and "deviation from their protocol" in md
    info = json.loads(read_metadata(out / "mhn_inception.safetensors")["info"])
    assert info["n_train"] == 4 and info["epochs"] == 1
    for f in (out / "generated").glob("*.png"):  # --stretch: each image spans 0..255
        x = np.array(Image.open(f))
        assert x.min() == 0 and x.max() == 255
    # a rerun with --overwrite reuses the fine-tuned Inception and the images
    code, text = run_evaluate([*args, "--overwrite"], capsys)
    assert code == 0 and "10 of 10 images already written" in text and "fine-tuned on" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--protocol", "mhn", "--inception", "x.pth"], "measures FID with --mhn-inception"),
        (["--mhn-inception", "x.pth"], "goes with --protocol mhn"),
        (["--protocol", "mhn", "--clip", "ViT-B-32:x.pt"], "clip-rsicd-v2's Hugging Face folder"),
        (["--protocol", "mhn", "--mhn-inception", "missing.pth"], "--fit-mhn-inception makes one"),
    ],
)
def test_evaluate_protocol_errors(tiny_ckpt, tmp_path, capsys, extra, message):
    code, text = run_evaluate(
        ["--weights", tiny_ckpt, "--test", "procedural:4", "--out", tmp_path, *extra], capsys
    )
    assert code == 2 and message in text, text
