"""Evaluate a text-to-image checkpoint on a captioned test set: generation, then every metric, one report.

    python evaluate.py --weights path/to/Text2Earth --test RSICD/dataset_rsicd.json --level 17 --out eval/rsicd \\
        --inception pt_inception-2015-12-05-6726825d.pth --clip ViT-B-32:RemoteCLIP-ViT-B-32.pt \\
        --resnet-init resnet18-f37072fd.pth
    python evaluate.py --weights out/demo/model.safetensors --test procedural:120 --size 32 32 \\
        --level-net out/demo/probe.safetensors --out eval/demo

Generation: --n images (default 10) from the first caption of each test image, at its level (the json's gsd_m,
the procedural level, or --level), written to OUT/generated/{key}_{k}.png with seed + n * i + k. A rerun keeps the
images already written (an interrupted run resumes) and refuses other generation settings unless --overwrite.
Without --weights, the images already in OUT/generated are evaluated as they are (another method's output).

Metrics, each run when the network it needs is given (nothing is downloaded):
  FID, KID, precision / recall   --inception: pytorch-fid's FID Inception-v3 weights (pt_inception-2015-12-05);
                                 --resize pytorch-fid (bilinear, its default) or clean (clean-fid's PIL bicubic)
  CLIP score, CMMD               --clip ARCH:FILE, an open_clip checkpoint (RemoteCLIP, GeoRSCLIP, OpenAI CLIP)
  zero-shot Cls-OA / AA          a ResNet-18 trained on the generated images labelled with their test image's class,
                                 tested on the real ones (Txt2Img-MHN's protocol); ImageNet init from --resnet-init
  resolution accuracy            --level-net: a level net (evaluation/classifier.py) or a probe (evaluation/probe.py),
                                 or --fit-level-net DATA trains one on images of known levels (procedural:N, Git-10M)
Writes OUT/report.json and OUT/report.md (the paper's table and the settings that define each number).
"""
import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from data.datasets import CaptionFolder, Git10M
from data.levels import asked_level
from data.synthetic import CLASSES as PROCEDURAL_CLASSES
from data.transforms import eval_transform, tensor_to_pil
from evaluation import classifier, clip as clipnet, metrics
from evaluation.inception import RESIZE_MODES, load_fid_inception, resize_for_fid
from evaluation.probe import load_probe, make_probe_data
from evaluation.report import evaluation_table
from evaluation.testset import ImageFiles, check_classes, load_testset
from model.pipeline import default_guidance, device_and_dtype, generate
from model.release import WeightsError
from model.samplers import SAMPLERS
from model.weights import load_weights, read_metadata, trained_size

GENERATION_KEYS = ("weights", "test", "n", "size", "sampler", "steps", "cfg", "level_cfg", "negative_prompt", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test", required=True,
                   help="Karpathy json (RSICD, UCM-Captions), a {file: caption} json, or procedural:N")
    p.add_argument("--split", default="test", help="split of a Karpathy json")
    p.add_argument("--image-root", default=None, help="test images' folder (default: `images` beside the json)")
    p.add_argument("--limit", type=int, default=None, help="only the first K test images")
    p.add_argument("--classes", default=None, help="expected class names (comma-separated or a file, one a line)")
    p.add_argument("--out", required=True, help="output folder (generated images, caches, report)")
    p.add_argument("--weights", default=None, help="diffusers-format folder or our .safetensors; omit to evaluate "
                                                   "the images already in OUT/generated")
    p.add_argument("--n", type=int, default=10, help="images generated per test image")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="generated size (default: the checkpoint's training size, else 256 256)")
    p.add_argument("--level", type=float, default=None, help="level for test images without one (0 = none)")
    p.add_argument("--resolution-m", type=float, default=None, help="metres per pixel (instead of --level)")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (1 = none)")
    p.add_argument("--level-cfg", type=float, default=None, help="guidance scale of the level on its own")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="images generated (and scored) together")
    p.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--resize", default="pytorch-fid", choices=RESIZE_MODES, help="resize to 299 for FID")
    p.add_argument("--clip", default=None, help="ARCH:FILE, an open_clip checkpoint, for CLIP score and CMMD")
    p.add_argument("--resnet-init", default=None, help="torchvision's ImageNet ResNet-18 weights for Cls-OA")
    p.add_argument("--cls-epochs", type=int, default=5)
    p.add_argument("--cls-size", type=int, default=256, help="Cls-OA image size")
    p.add_argument("--cls-batch", type=int, default=64)
    p.add_argument("--cls-lr", type=float, default=1e-4)
    p.add_argument("--level-net", default=None, help="a level net or probe .safetensors, for resolution accuracy")
    p.add_argument("--fit-level-net", default=None, metavar="DATA",
                   help="train a level net (OUT/level_net.safetensors) on images of known levels: procedural:N, a "
                        "Git-10M folder or a caption manifest (.jsonl / .csv) with levels")
    p.add_argument("--level-images", type=int, default=5000, help="at most this many images for --fit-level-net")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="U-Net / text encoder precision")
    p.add_argument("--overwrite", action="store_true", help="regenerate under new settings, rewrite the report")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch < 1 or args.cls_epochs < 1 or (args.limit is not None
                                                                                 and args.limit < 2):
        p.error("--n, --steps, --batch and --cls-epochs must be >= 1, --limit >= 2")
    try:
        args.level = asked_level(args.level, args.resolution_m)
        args.device, args.dtype = device_and_dtype(args.device, args.dtype)
        if args.clip:
            args.clip = clipnet.parse_spec(args.clip)
    except ValueError as e:
        p.error(str(e))
    for flag, path in (("--inception", args.inception), ("--resnet-init", args.resnet_init),
                       ("--level-net", args.level_net), ("--clip", args.clip and args.clip[1])):
        if path and not Path(path).is_file():
            what = {"--inception": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
                    "--resnet-init": "torchvision's ImageNet ResNet-18 (resnet18-f37072fd.pth)",
                    "--level-net": "a level net or probe .safetensors", "--clip": "an open_clip checkpoint"}[flag]
            p.error(f"{flag} {path}: no such file (expected {what} there)")
    if args.classes:
        src = Path(args.classes)
        names = src.read_text().splitlines() if src.is_file() else args.classes.split(",")
        args.classes = [c.strip() for c in names if c.strip()]
    args.parser = p
    return args


# ----------------------------------------------------------------------------------------------
# Generation, resumable
# ----------------------------------------------------------------------------------------------

def settings_of(args, size):
    return {"weights": str(args.weights), "test": str(args.test), "n": args.n, "size": list(size),
            "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "level_cfg": args.level_cfg,
            "negative_prompt": args.negative_prompt, "seed": args.seed}


def check_resume(folder, settings, overwrite, p):
    """The generated folder's settings file against this run's: other settings -> exit 2, or start over."""
    record = folder / "generation.json"
    if record.is_file():
        old = json.loads(record.read_text())
        differ = [k for k in GENERATION_KEYS if old.get(k) != settings.get(k)]
        if differ and not overwrite:
            p.error(f"{folder} holds images generated with other settings ({', '.join(differ)}: "
                    f"{', '.join(str(old.get(k)) for k in differ)}); pass --overwrite or another --out")
        if differ:
            for f in folder.glob("*.png"):
                f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, record)


def generate_missing(model, jobs, args, size):
    """Sample every (path, caption, level, seed) job whose file does not exist yet; files are written atomically."""
    todo = [j for j in jobs if not j[0].exists()]
    print(f"generation: {len(jobs) - len(todo)} of {len(jobs)} images already written, {len(todo)} to go")
    guidance = default_guidance(model, args.cfg, args.level_cfg)
    has_level = "level" in model.cfg.condition_names()
    for i in tqdm(range(0, len(todo), args.batch), desc="generating", disable=not todo):
        batch = todo[i:i + args.batch]
        cond = {"text": [j[1] for j in batch]}
        if has_level:
            cond["level"] = [j[2] for j in batch]
        images = generate(model, cond, seeds=[j[3] for j in batch], sampler=args.sampler, steps=args.steps,
                          guidance=guidance, negative_prompt=args.negative_prompt, size=tuple(size), dtype=args.dtype)
        for (path, text, level, seed), image in zip(batch, images):
            info = PngInfo()
            for k, v in {"prompt": text, "level": f"{level:g}", "seed": seed, "sampler": args.sampler,
                         "steps": args.steps, "cfg": args.cfg, "weights": args.weights}.items():
                info.add_text(k, str(v))
            tmp = path.with_suffix(".tmp.png")
            tensor_to_pil(image).save(tmp, pnginfo=info)
            os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def inception_features(net, files, mode, batch, device):
    out = []
    for b in tqdm(files.batches(batch), total=math.ceil(len(files) / batch), desc="Inception", leave=False):
        x = torch.cat([resize_for_fid(im[None], mode) for im in b]).to(device)   # B, 3, 299, 299
        out.append(net(x).double().cpu())
    return torch.cat(out)


def distribution_metrics(args, real, fake, cache):
    """FID, KID, precision / recall on Inception features; the real set's features are cached."""
    net = load_fid_inception(args.inception, args.device)
    key = metrics.cache_key(real.paths, net=str(Path(args.inception).resolve()), resize=args.resize)
    fr = metrics.cached_features(cache, "inception", key,
                                 lambda: inception_features(net, real, args.resize, args.batch, args.device))
    ff = inception_features(net, fake, args.resize, args.batch, args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid = metrics.fid(fr, ff)
    cross = metrics.frechet_distance_eigvals(*metrics.stats(fr), *metrics.stats(ff))     # another route to the same
    kid = metrics.kernel_distance(fr, ff)
    pr = metrics.precision_recall(fr, ff)
    impl = f"pytorch-fid Inception-v3 weights ({Path(args.inception).name}), resize {args.resize}"
    notes = [str(w.message) for w in caught]
    return {"fid": dict(value=fid, eigvals_form=cross, implementation=impl, n_real=len(fr), n_fake=len(ff),
                        notes=notes),
            "kid": dict(value=kid["mean"], std=kid["std"], subset_size=kid["subset_size"], subsets=100,
                        implementation=impl),
            "precision": dict(value=pr["precision"], k=pr["k"], implementation=impl),
            "recall": dict(value=pr["recall"], k=pr["k"], implementation=impl)}


def clip_metrics(args, real, fake, captions, real_captions, cache):
    """CLIP score of each generated image with its caption (and of the real images, the reference), and CMMD."""
    net = clipnet.load_clip(*args.clip, device=args.device)
    key = metrics.cache_key(real.paths, clip=f"{args.clip[0]}:{Path(args.clip[1]).resolve()}")
    er = metrics.cached_features(cache, "clip", key, lambda: clipnet.image_embeddings(net, real.batches(args.batch)))
    ef = clipnet.image_embeddings(net, fake.batches(args.batch))
    return {"clip_score": dict(value=clipnet.clip_score(ef, clipnet.text_embeddings(net, captions)),
                               real_images=clipnet.clip_score(er, clipnet.text_embeddings(net, real_captions)),
                               implementation=f"100 * max(cos, 0), {net.name}"),
            "cmmd": dict(value=metrics.clip_mmd(er, ef), implementation=f"RBF sigma 10 x1000, {net.name}")}


def cls_metrics(args, images, jobs, classes):
    """Zero-shot Cls-OA over the test images that have a class (RSICD's numeric names have none) and their
    generated images."""
    index = {c: i for i, c in enumerate(classes)}
    labelled = [i for i, im in enumerate(images) if im.label is not None]
    gen = ImageFiles([jobs[args.n * i + k][0] for i in labelled for k in range(args.n)], size=args.cls_size)
    test = ImageFiles([images[i].path for i in labelled], size=args.cls_size)
    labels = [index[images[i].label] for i in labelled]
    r = classifier.zero_shot_cls(gen, [c for c in labels for _ in range(args.n)], test, labels, classes,
                                 epochs=args.cls_epochs, batch_size=args.cls_batch, lr=args.cls_lr,
                                 size=args.cls_size, init=args.resnet_init, seed=args.seed, progress=True,
                                 device=args.device)
    unlabelled = f", {len(images) - len(labelled)} test images without a class left out" \
        if len(labelled) < len(images) else ""
    return {"cls_oa": dict(value=r["oa"], aa=r["aa"], per_class=r["per_class"], n_train=r["n_train"],
                           n_test=r["n_test"], implementation=f"ResNet-18, {r['init']}, {r['epochs']} epochs, Adam "
                           f"{r['lr']:g}, batch {r['batch_size']}, {r['size']} px{unlabelled}")}


def level_metrics(args, fake, asked, fake_names):
    """Resolution accuracy of the generated images by the level net; with a probe also the class it reads."""
    is_net = read_metadata(args.level_net).get("format") == classifier.FORMAT
    out = {}
    if is_net:
        net, info = classifier.load_net(args.level_net)
        if info["kind"] != "levels":
            raise ValueError(f"--level-net {args.level_net}: a scene classifier, not a level net")
        pred = classifier.predict_levels(net.to(args.device), fake)
    else:
        probe = load_probe(args.level_net)
        read = [probe.predict(torch.stack(b)) for b in fake.batches(256)]                # (class, level) per batch
        cls, pred = torch.cat([c for c, _ in read]), torch.cat([lv for _, lv in read])
        if fake_names is not None and set(fake_names) <= set(PROCEDURAL_CLASSES):    # the probe's own classes
            read = [PROCEDURAL_CLASSES[c] for c in cls.tolist()]
            out["probe_class"] = dict(value=sum(a == b for a, b in zip(read, fake_names)) / len(read),
                                      implementation=f"probe {Path(args.level_net).name}")
    r = classifier.resolution_accuracy(pred, torch.as_tensor(asked))
    out["level"] = dict(value=r["exact"], within_one=r["within_one"], corr=metrics.finite_or_none(r["corr"]),
                        n=r["n"], implementation=f"{'level net' if is_net else 'probe'} "
                                                 f"{Path(args.level_net).name}")
    return out


def level_training_set(spec, size, limit):
    """(images (N, 3, size, size) in [-1, 1], levels (N,)) of known levels from a --fit-level-net spec."""
    if spec.startswith("procedural:"):
        n = int(spec.split(":", 1)[1]) if spec.split(":", 1)[1].isdigit() else 0
        if n < 2:
            raise ValueError(f"--fit-level-net {spec!r}: expected procedural:N, N >= 2")
        images, _, levels = make_probe_data(min(n, limit), size=size, seed=7)   # scenes apart from the test set's
        return images, levels
    path, transform = Path(spec), eval_transform(size)
    if path.is_dir():
        data = Git10M(path, split="train", transform=transform)
    elif path.is_file():
        data = CaptionFolder(path, transform=transform)
    else:
        raise ValueError(f"--fit-level-net {spec}: no such folder or manifest")
    items = [x for x in (data[i] for i in range(min(len(data), limit))) if x is not None and x["level"] > 0]
    if len(items) < 2:
        raise ValueError(f"--fit-level-net {spec}: fewer than 2 images with a known level (> 0)")
    return torch.stack([x["image"] for x in items]), torch.tensor([x["level"] for x in items])


def fit_level_net(args, path):
    """Train the level net on --fit-level-net's images (ResNet-18 over integer levels, --cls-* settings), save it."""
    images, levels = level_training_set(args.fit_level_net, args.cls_size, args.level_images)
    print(f"level net: {len(images)} images of levels {levels.min():g}..{levels.max():g} from {args.fit_level_net}")
    net = classifier.train_level_net(list(images), levels, epochs=args.cls_epochs, batch_size=args.cls_batch,
                                     lr=args.cls_lr, size=args.cls_size, seed=args.seed, progress=True,
                                     device=args.device)
    classifier.save_net(net.cpu(), path, {"trained_on": args.fit_level_net, "images": len(images)})
    return path


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    p = args.parser
    out = Path(args.out)
    report_json, report_md = out / "report.json", out / "report.md"
    if report_json.exists() and not args.overwrite:
        p.error(f"{report_json} exists (the evaluation in {out} is complete); pass --overwrite to recompute it")
    size = args.size or ([trained_size(args.weights)] * 2 if args.weights and trained_size(args.weights) else
                         [256, 256])
    try:                                    # procedural test scenes are rendered at the generated size
        images, found = load_testset(args.test, args.split, args.image_root, out=out / "real", size=size[0])
        classes = check_classes(found, args.classes)
    except ValueError as e:
        p.error(str(e))
    images = images[:args.limit] if args.limit else images
    levels = [im.level if im.level is not None else args.level for im in images]
    gen = out / "generated"
    jobs = [(gen / f"{im.key}_{k}.png", im.caption, lv, args.seed + args.n * i + k)
            for i, (im, lv) in enumerate(zip(images, levels)) for k in range(args.n)]
    if args.weights is not None:
        try:
            model = load_weights(args.weights, args.device, dtype={"unet": args.dtype, "text_encoder": args.dtype})
        except WeightsError as e:
            p.error(f"--weights: {e}")
        if model.cfg.unet.in_channels != model.cfg.unet.out_channels:
            p.error(f"--weights {args.weights}: an inpainting U-Net ({model.cfg.unet.in_channels} input channels) "
                    "does not generate from text alone")
        if "level" in model.cfg.condition_names() and any(lv is None for lv in levels):
            p.error(f"{args.test} gives no level for its images: pass --level or --resolution-m (0 = none)")
        if size[0] % model.vae.downsample or size[1] % model.vae.downsample:
            p.error(f"--size {size[0]} {size[1]}: must be multiples of {model.vae.downsample}")
        settings = settings_of(args, size)
        check_resume(gen, settings, args.overwrite, p)
        generate_missing(model.eval(), jobs, args, size)
        del model
    else:
        missing = [j[0] for j in jobs if not j[0].exists()]
        if missing:
            p.error(f"without --weights the generated images must exist: {len(missing)} of {len(jobs)} missing, "
                    f"e.g. {missing[0]}")
        settings = json.loads((gen / "generation.json").read_text()) if (gen / "generation.json").is_file() else {}

    if args.fit_level_net:
        net_path = out / "level_net.safetensors"
        try:
            args.level_net = str(net_path if net_path.is_file() and not args.overwrite else fit_level_net(args, net_path))
        except ValueError as e:
            p.error(str(e))
    real, fake = ImageFiles([im.path for im in images]), ImageFiles([j[0] for j in jobs])
    captions = [j[1] for j in jobs]
    fake_names = [im.label for im in images for _ in range(args.n)] if all(im.label for im in images) else None
    results, skipped = {}, {}
    steps = [("fid", args.inception, "--inception", lambda: distribution_metrics(args, real, fake, out / "cache")),
             ("clip", args.clip, "--clip", lambda: clip_metrics(args, real, fake, captions,
                                                                [im.caption for im in images], out / "cache")),
             ("cls", classes, "classes in the test set", lambda: cls_metrics(args, images, jobs, classes)),
             ("level", args.level_net and all(lv for lv in levels), "--level-net and known levels",
              lambda: level_metrics(args, fake, [j[2] for j in jobs], fake_names))]
    try:
        for name, needed, flag, run in steps:
            if needed:
                print(f"metrics: {name}")
                results.update(run())
            else:
                skipped[name] = f"needs {flag}"
    except (WeightsError, ValueError) as e:
        p.error(str(e))
    report = {"weights": args.weights or settings.get("weights"), "test": str(args.test), "split": args.split,
              "n_test": len(images), "n_generated": len(jobs), "classes": classes, "generation": settings,
              "metrics": results, "skipped": skipped}
    out.mkdir(parents=True, exist_ok=True)
    report_json.write_text(json.dumps(report, indent=1))
    report_md.write_text(evaluation_table(report))
    print(report_md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
