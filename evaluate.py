"""Evaluate a text-to-image checkpoint on a captioned test set: generation, then every metric,
one report.

    python evaluate.py --weights path/to/Text2Earth --test RSICD/dataset_rsicd.json --level 17 \\
        --out eval/rsicd --inception pt_inception-2015-12-05-6726825d.pth \\
        --clip ViT-B-32:RemoteCLIP-ViT-B-32.pt --resnet-init resnet18-f37072fd.pth
    python evaluate.py --weights out/demo/model.safetensors --test procedural:120 --cfg 3 \\
        --level-cfg 6 --level-net configs/pretrained/demo_probe.safetensors --cls-size 32 \\
        --out eval/demo

Generation: --n images (default 10) from the first caption of each test image, at its level (the
json's gsd_m, the procedural level, or --level), written to OUT/generated/{key}_{k}.png with
seed + n * i + k. A rerun keeps the images already written (an interrupted run resumes) and refuses
other generation settings unless --regenerate. Without --weights, the images already in
OUT/generated are evaluated as they are (another method's output). Under `torchrun
--nproc_per_node=N -- evaluate.py ...` the N processes share the generation (one GPU each, the same
images as one process) and rank 0 computes the metrics.

Metrics, each run when the network it needs is given (nothing is downloaded):
  FID, KID, precision / recall   --inception: pytorch-fid's FID Inception-v3 weights
                                 (pt_inception-2015-12-05); --resize pytorch-fid (bilinear, its
                                 default) or clean (clean-fid's PIL bicubic)
  CLIP score, CMMD               --clip ARCH:FILE, an open_clip checkpoint (RemoteCLIP, GeoRSCLIP,
                                 OpenAI CLIP), or hf:FOLDER, a Hugging Face CLIP / SigLIP folder
  zero-shot Cls-OA / AA          a ResNet-18 trained on the generated images labelled with their
                                 test image's class, tested on the real ones (Txt2Img-MHN's
                                 protocol); ImageNet init from --resnet-init
  resolution accuracy            --level-net: a level net (evaluation/classifier.py) or a probe
                                 (evaluation/probe.py), or --fit-level-net DATA trains one on images
                                 of known levels (procedural:N, Git-10M)
  realism (--realism)            no download: a two-sample test (a small CNN from scratch tells one
                                 generated image per test image from the real ones; 50% =
                                 indistinguishable) and FID / KID in the features of a CNN trained
                                 on the real training split's classes (evaluation/realism.py), each
                                 beside the same figure for two real sets (test against val)

--protocol mhn measures instead as Txt2Img-MHN's released code does, the protocol of the papers'
RSICD table (evaluation/mhn.py): FID and IS through their RSICD-tuned Inception (--mhn-inception, or
--fit-mhn-inception IMAGENET_FILE makes one), clip-rsicd-v2's dot score (--clip hf:FOLDER), their
Cls-OA loop, every RSICD image not in train as the test set; the report lists the deviations.
Writes OUT/report.json and OUT/report.md (the paper's table and the settings that define each
number).
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cli import distributed, sampling as cli
from data.places import SPLITS, in_split
from data.synthetic import CLASSES as PROCEDURAL_CLASSES
from evaluation import classifier, clip as clipnet, hf_clip, metrics, mhn, realism
from evaluation.inception import RESIZE_MODES, fid_features, load_fid_inception
from evaluation.probe import load_probe
from evaluation.report import evaluation_table
from evaluation.testset import ImageFiles, check_classes, karpathy, level_images, load_testset
from model.pipeline import generate
from model.release import WeightsError
from model.weights import read_metadata, trained_size

PROTOCOLS = ("ours", "mhn")  # the metrics' networks and preprocessing (docs/evaluation.md)


def parse_args(argv=None):
    """(args, parser, values): the flags, checked, and {condition: value} of the scalar conditions
    asked for."""
    argv = sys.argv[1:] if argv is None else argv
    model_cfg = cli.model_config_for(argv, default=None)
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--test",
        required=True,
        help="Karpathy json (RSICD, UCM-Captions), a {file: caption} json, procedural:N, or "
        "procedural-globe:N (scenes at places of the procedural globe, each class drawn from "
        "its place's)",
    )
    p.add_argument(
        "--protocol",
        default="ours",
        choices=PROTOCOLS,
        help="ours: pytorch-fid's FID, open_clip or HF cosine CLIP score, Cls-OA; mhn: "
        "Txt2Img-MHN's, which the papers' RSICD table follows (evaluation/mhn.py)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="split of a Karpathy json; !NAME = every image not in NAME (default: test; with "
        "--protocol mhn !train, their RSICD test set)",
    )
    p.add_argument(
        "--places",
        default="all",
        choices=SPLITS,
        help="side of the spatial split (data/places.py) the test images come from: held_out = "
        "only images in the regions training leaves out",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="test images' folder (default: images/, imgs/, RSICD_images/ or NWPU_images/ beside "
        "the json, the first that exists)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first K test images")
    p.add_argument(
        "--classes",
        default=None,
        help="expected class names (comma-separated or a file, one a line)",
    )
    p.add_argument("--out", required=True, help="output folder (generated images, caches, report)")
    cli.add_model_flags(
        p,
        weights=None,
        weights_help="diffusers-format folder or our .safetensors; omit to "
        "evaluate the images already in OUT/generated",
    )
    p.add_argument("--n", type=int, default=10, help="images generated per test image")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="generated size (default: the checkpoint's training size, else 256 256)",
    )
    cli.add_sampling_flags(p)
    cli.add_condition_flags(p, model_cfg)  # --level: for test images without one
    p.add_argument("--batch", type=int, default=16, help="images generated (and scored) together")
    p.add_argument(
        "--inception",
        default=None,
        help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument(
        "--resize", default="pytorch-fid", choices=RESIZE_MODES, help="resize to 299 for FID"
    )
    p.add_argument(
        "--clip",
        default=None,
        help="ARCH:FILE, an open_clip checkpoint, or hf:FOLDER, a Hugging Face CLIP / SigLIP "
        "folder, for CLIP score and CMMD (mhn: clip-rsicd-v2's folder, for their dot score)",
    )
    p.add_argument(
        "--resnet-init", default=None, help="torchvision's ImageNet ResNet-18 weights for Cls-OA"
    )
    p.add_argument("--cls-epochs", type=int, default=5)
    p.add_argument("--cls-size", type=int, default=256, help="Cls-OA image size")
    p.add_argument("--cls-batch", type=int, default=64)
    p.add_argument("--cls-lr", type=float, default=1e-4)
    p.add_argument(
        "--level-net",
        default=None,
        help="a level net or probe .safetensors, for resolution accuracy",
    )
    p.add_argument(
        "--fit-level-net",
        default=None,
        metavar="DATA",
        help="train a level net (OUT/level_net.safetensors) on images of known levels: "
        "procedural:N, a Git-10M folder or a caption manifest (.jsonl / .csv) with levels",
    )
    p.add_argument(
        "--level-images",
        type=int,
        default=5000,
        help="at most this many images for --fit-level-net",
    )
    add_mhn_flags(p)
    add_realism_flags(p)
    p.add_argument(
        "--overwrite", action="store_true", help="recompute the metrics of a finished evaluation"
    )
    p.add_argument(
        "--regenerate",
        action="store_true",
        help="delete the images generated under other settings (or of unknown origin) "
        "and start over",
    )
    args = p.parse_args(argv)
    if (
        min(args.n, args.steps, args.batch, args.cls_epochs, args.level_images) < 1
        or args.cls_batch < 2
        or (args.limit is not None and args.limit < 2)
        or (args.size is not None and min(args.size) < 8)
    ):
        p.error(
            "--n, --steps, --batch, --cls-epochs and --level-images must be >= 1, "
            "--cls-batch and --limit >= 2, --size >= 8"
        )
    check_protocol(args, p)
    check_realism(args, p)
    args.device = distributed.local_device(args.device)  # under torchrun: this rank's GPU
    args.device, args.dtype = cli.check_sampling(args, p)
    values = cli.condition_values(args, model_cfg, p)
    check_networks(args, p)
    if args.classes:
        src = Path(args.classes)
        names = src.read_text().splitlines() if src.is_file() else args.classes.split(",")
        args.classes = [c.strip() for c in names if c.strip()]
    return args, p, values


def check_networks(args, p):
    """Every network file given exists and is of the kind its flag takes."""
    try:
        if args.clip:
            args.clip = clipnet.parse_spec(args.clip)
    except ValueError as e:
        p.error(str(e))
    if args.clip and args.protocol == "mhn" and args.clip[0] != clipnet.HF:
        p.error("--protocol mhn: --clip takes clip-rsicd-v2's Hugging Face folder (hf:FOLDER)")
    for flag, path in (
        ("--inception", args.inception),
        ("--resnet-init", args.resnet_init),
        ("--level-net", args.level_net),
        ("--clip", args.clip and args.clip[0] != clipnet.HF and args.clip[1]),
        ("--mhn-inception", args.mhn_inception),
        ("--fit-mhn-inception", args.fit_mhn_inception),
    ):
        if path and not Path(path).is_file():
            what = {
                "--inception": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
                "--resnet-init": "torchvision's ImageNet ResNet-18 (resnet18-f37072fd.pth)",
                "--level-net": "a level net or probe .safetensors",
                "--clip": "an open_clip checkpoint",
                "--mhn-inception": "a fine-tuned Inception (--fit-mhn-inception makes one)",
                "--fit-mhn-inception": "torchvision's inception_v3_google-0cc3c7bd.pth",
            }[flag]
            p.error(f"{flag} {path}: no such file (expected {what} there)")
    if args.level_net:
        check_level_net(args, p)
    if args.clip:
        check_clip(args, p)


def check_level_net(args, p):
    """--level-net is a level net, or a probe for a procedural test set."""
    try:
        meta = read_metadata(args.level_net)
    except WeightsError as e:
        p.error(f"--level-net: {e}")
    kind = (
        json.loads(meta.get("net", "{}")).get("kind")
        if meta.get("format") == classifier.FORMAT
        else ("probe" if meta.get("format") == "text2earth-probe" else None)
    )
    if kind not in ("levels", "probe"):
        p.error(
            f"--level-net {args.level_net}: neither a level net "
            "(evaluate.py --fit-level-net) nor a probe (evaluation/probe.py)"
            + (" but a scene classifier" if kind == "classes" else "")
        )
    if kind == "probe" and not str(args.test).startswith("procedural:"):
        p.error(
            f"--level-net {args.level_net}: a probe reads procedural Earth renders only; "
            f"give a level net for {args.test} (--fit-level-net on images of known levels)"
        )


def check_clip(args, p):
    """--clip, parsed to (ARCH, FILE) or (HF, FOLDER), names a network its protocol can use."""
    if args.clip[0] == clipnet.HF:
        try:
            kind = hf_clip.check_folder(args.clip[1])
        except WeightsError as e:
            p.error(f"--clip: {e}")
        if args.protocol == "mhn" and kind != "clip":
            p.error(
                f"--clip {args.clip[1]}: a {kind} folder; their score is clip-rsicd-v2's (CLIP)"
            )
    elif args.clip[0] not in clipnet.architectures():
        p.error(
            f"--clip: unknown open_clip architecture {args.clip[0]!r} "
            "(open_clip.list_models() has them)"
        )


def add_mhn_flags(p):
    """The flags of --protocol mhn's networks and image lists."""
    g = p.add_argument_group("--protocol mhn (Txt2Img-MHN's evaluation, evaluation/mhn.py)")
    g.add_argument(
        "--mhn-inception",
        default=None,
        help="their Inception-v3 fine-tuned on RSICD's 30 classes (FID, IS); never released: "
        "--fit-mhn-inception makes one",
    )
    g.add_argument(
        "--fit-mhn-inception",
        default=None,
        metavar="IMAGENET_FILE",
        help="fine-tune it first from torchvision's ImageNet Inception-v3 file "
        "(inception_v3_google-0cc3c7bd.pth) on --mhn-train, to OUT/mhn_inception.safetensors",
    )
    g.add_argument(
        "--mhn-train",
        default=None,
        metavar="LIST",
        help="its training images: their RSICD_train.txt (9000 lines '<class>/<name>.jpg "
        "<label>', files found in the image root by name); default the json's train split",
    )
    g.add_argument("--mhn-epochs", type=int, default=10, help="its fine-tuning epochs")
    g.add_argument(
        "--mhn-fid-lists",
        nargs=2,
        default=None,
        metavar=("REAL", "GENERATED"),
        help="their FID lists (is_fid_score/dataset/RSICD_test.txt, RSICD_gen.txt); default "
        f"{mhn.FID_IMAGES} of each drawn with a fixed seed",
    )
    g.add_argument(
        "--stretch",
        action="store_true",
        help="save generated images min-max stretched, as their gen_im.py did (save_image "
        "normalize=True)",
    )


def check_protocol(args, p):
    """Each protocol's flags with its protocol; the split's default."""
    mhn_flags = ("mhn_inception", "fit_mhn_inception", "mhn_train", "mhn_fid_lists")
    if args.protocol == "ours":
        given = [f for f in mhn_flags if getattr(args, f)]
        if given:
            p.error(f"--{given[0].replace('_', '-')} goes with --protocol mhn")
    elif args.inception:
        p.error("--protocol mhn measures FID with --mhn-inception, not pytorch-fid's --inception")
    if args.mhn_inception and args.fit_mhn_inception:
        p.error("--mhn-inception or --fit-mhn-inception, not both")
    if args.mhn_epochs < 1:
        p.error(f"--mhn-epochs must be >= 1, got {args.mhn_epochs}")
    if args.split is None:  # their RSICD test set: every image of the json not in train
        karpathy = str(args.test).endswith(".json")
        args.split = mhn.NOT_TRAIN if args.protocol == "mhn" and karpathy else "test"


# ----------------------------------------------------------------------------------------------
# Generation, resumable
# ----------------------------------------------------------------------------------------------


def add_realism_flags(p):
    """The realism metrics' flags (evaluation/realism.py)."""
    g = p.add_argument_group("--realism (evaluation/realism.py; nothing downloaded)")
    g.add_argument(
        "--realism",
        action="store_true",
        help="two-sample test accuracy and feature-space FID / KID of one generated image per "
        "test image against the real test images",
    )
    g.add_argument(
        "--realism-size", type=int, default=64, help="the size both sets are compared at"
    )
    g.add_argument(
        "--realism-steps", type=int, default=1500, help="training steps of the feature net"
    )
    g.add_argument(
        "--realism-train",
        default=None,
        metavar="JSON",
        help="a Karpathy json whose train split (with classes) trains the feature net (default: "
        "--test when it is one; none: no feature FID)",
    )
    g.add_argument(
        "--realism-net",
        default=None,
        metavar="FILE",
        help="the feature net: reused when the file exists, else trained on --realism-train and "
        "written there (default OUT/realism_net.safetensors); give one file to compare runs",
    )
    g.add_argument(
        "--realism-reference",
        default=None,
        metavar="SPLIT",
        help="a second real split of a Karpathy --test, measured against the test images the same "
        "way: the figures of real against real (default val when the json has one; none: skip)",
    )


def check_realism(args, p):
    """--realism's settings: the size, the training json, the reference split."""
    if not args.realism:
        return
    if args.realism_size < 16 or args.realism_steps < 1:
        p.error(
            f"--realism-size must be >= 16 and --realism-steps >= 1, got {args.realism_size} and "
            f"{args.realism_steps}"
        )
    splits = karpathy_splits(args.test)  # None: not a Karpathy json
    if args.realism_train is None:
        args.realism_train = args.test if splits and "train" in splits else "none"
    if args.realism_train != "none" and "train" not in (karpathy_splits(args.realism_train) or ()):
        p.error(
            f"--realism-train {args.realism_train}: not a Karpathy json with a train split (or no "
            "such file)"
        )
    if args.realism_reference is None:
        args.realism_reference = "val" if splits and "val" in splits else "none"
    if args.realism_reference != "none" and args.realism_reference not in (splits or ()):
        p.error(
            f"--realism-reference {args.realism_reference}: needs a Karpathy json --test with "
            f"that split (splits: {sorted(splits) if splits else 'none'})"
        )


def karpathy_splits(path):
    """The split names of a Karpathy json's images, or None when `path` is not one."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
        return None
    return {im.get("split") for im in meta["images"] if isinstance(im, dict)}


def realism_net_of(args, out, classes, size):
    """(net, info): the feature net of --realism-net (default OUT/realism_net.safetensors), loaded,
    or trained on --realism-train's train split and written there; (None, reason) when there is
    none to train on."""
    path = Path(args.realism_net or out / "realism_net.safetensors")
    if path.is_file():
        net, info = realism.load_feature_net(path)
        if net.size != args.realism_size:
            raise ValueError(
                f"--realism-net {path} reads {net.size} px images, --realism-size is "
                f"{args.realism_size}"
            )
        return net, {**info, "file": str(path)}
    if args.realism_train == "none":
        return None, "needs --realism-train (a Karpathy json with classes) or --realism-net"
    train = karpathy(args.realism_train, "train", args.image_root)
    names = classes or sorted({im.label for im in train if im.label is not None})
    unknown = sorted({im.label for im in train} - set(names))
    if unknown or len(names) < 2:
        raise ValueError(
            f"--realism-train {args.realism_train}: its train split needs a class per image from "
            f"the test set's classes (unknown: {unknown[:3]}, {len(names)} classes)"
        )
    print(f"realism: training the feature net on {len(train)} images ({path})")
    net = realism.train_feature_net(
        realism.FilesAsTrained([im.path for im in train], size),
        [names.index(im.label) for im in train],
        len(names),
        size=args.realism_size,
        steps=args.realism_steps,
        seed=args.seed,
    )
    info = {
        "train": str(args.realism_train),
        "split": "train",
        "n": len(train),
        "read_at": size,
        "steps": args.realism_steps,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    realism.save_feature_net(net, path, info)
    return net, {**info, "file": str(path), "width": net.width, "size": net.size}


def realism_metrics(args, images, jobs, classes, size, out):
    """The two-sample test and the feature-space FID / KID of the first generated image of each
    test image against the real test images (read as training data is made, at the generated size),
    each with the same figure for the --realism-reference split against the test images."""
    real = realism.FilesAsTrained([im.path for im in images], size[0])
    fake = ImageFiles([jobs[args.n * i][0] for i in range(len(images))], size=size[0])
    reference = None
    if args.realism_reference != "none":
        ref = karpathy(args.test, args.realism_reference, args.image_root)
        reference = realism.FilesAsTrained([im.path for im in ref], size[0])
    c2st = realism.two_sample_accuracy(
        real, fake, size=args.realism_size, seed=args.seed, paired=True
    )
    entry = dict(
        value=c2st["accuracy"],
        interval=list(c2st["interval"]),
        stderr=c2st["stderr"],
        auc=c2st["auc"],
        p_value=c2st["p_value"],
        n_real=c2st["n_real"],
        n_fake=c2st["n_fake"],
        implementation=f"Critic width {c2st['width']} from scratch, {c2st['folds']} folds x "
        f"{c2st['steps']} steps, {c2st['size']} px, one generated image per test image, in its "
        "fold; 50% = indistinguishable",
    )
    if reference is not None:
        r = realism.two_sample_accuracy(real, reference, size=args.realism_size, seed=args.seed)
        entry["reference"] = dict(
            split=args.realism_reference, value=r["accuracy"], interval=list(r["interval"])
        )
    results = {"c2st": entry}
    net, info = realism_net_of(args, out, classes, size[0])
    if net is None:
        results["c2st"]["notes"] = [f"no feature FID: {info}"]
        return results
    d = realism.feature_distances(net, real, fake)
    entry = dict(
        value=d["fid"],
        kid=d["kid"],
        kid_std=d["kid_std"],
        n_real=d["n_real"],
        n_fake=d["n_fake"],
        net=info,
        implementation=f"FID in the {d['dim']} pooled features of {info['file']} (a CNN trained "
        f"from scratch on {info.get('train')}'s {info.get('split')} split, {net.size} px)",
    )
    if reference is not None:
        r = realism.feature_distances(net, real, reference)
        entry["reference"] = dict(split=args.realism_reference, value=r["fid"], kid=r["kid"])
    results["feature_fid"] = entry
    return results


def settings_of(args, size, values, model_cfg):
    """What defines the generated images: the weights and LoRAs, the test set, each condition's
    value and own guidance scale, the sampler. The batch matters to the ddpm sampler only (its noise
    is drawn per batch)."""
    own = {
        f"{name}_cfg": getattr(args, f"{name}_cfg", None)
        for name in model_cfg.unet.embedded_conditions()
    }
    return {
        "weights": str(args.weights),
        "lora": list(args.lora),
        "test": str(args.test),
        "split": args.split,
        "places": args.places,
        "image_root": args.image_root,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
        "n": args.n,
        "size": list(size),
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        **own,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "dtype": str(args.dtype),
        "batch": args.batch if args.sampler == "ddpm" else None,
        **({"stretch": True} if args.stretch else {}),
    }


def generate_missing(model, guidance, jobs, args, size):
    """Make the images of `jobs` ((path, cli.Job)) whose file does not exist yet, this process's
    share under torchrun (cli/distributed.py): the job list in fixed batches of --batch, a batch
    with a file missing generated whole, so every image comes from the same batch on any number of
    processes and after any interruption; its missing files are written atomically."""
    rank, world = distributed.rank_and_world()
    mine, missing = distributed.share_of_batches([path for path, _ in jobs], args.batch)
    if rank == 0:
        print(
            f"generation: {len(jobs) - missing} of {len(jobs)} images already written, "
            f"{missing} to go" + (f" ({world} processes)" if world > 1 and missing else "")
        )
    settings = cli.settings(args, model.cfg)
    for r in tqdm(mine, desc="generating", disable=rank > 0 or not mine):
        batch = [jobs[i] for i in r]
        jobs_here = [job for _, job in batch]
        cond = cli.job_conditions(model.cfg, jobs_here, [job.text for job in jobs_here])
        images = generate(
            model,
            cond,
            seeds=[job.seed for _, job in batch],
            sampler=args.sampler,
            steps=args.steps,
            guidance=guidance,
            negative_prompt=args.negative_prompt,
            size=tuple(size),
            dtype=args.dtype,
        )
        for (path, job), image in zip(batch, images):
            if path.exists():  # made before, in this same batch
                continue
            if args.stretch:  # their gen_im.py: save_image(normalize=True)
                image = mhn.stretch(image).float() / 127.5 - 1
            info = {
                "prompt": job.text,
                **cli.condition_text(model.cfg, job.values),
                "seed": job.seed,
                **settings,
            }
            cli.save_png(image, path, info)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def inception_sets(args, real, fake, cache, computed):
    """Inception pool features of the real (cached on disk in `cache`) and generated images,
    computed once per run (kept in the dict `computed`)."""
    if "inception" not in computed:
        net = load_fid_inception(args.inception, args.device)
        # the images and the net file
        key = metrics.cache_key([*real.paths, args.inception], resize=args.resize)
        fr = metrics.cached_features(
            cache,
            "inception",
            key,
            lambda: fid_features(net, real.batches(args.batch), args.resize, args.batch),
        )
        computed["inception"] = (
            fr,
            fid_features(net, fake.batches(args.batch), args.resize, args.batch),
        )
    return computed["inception"]


def distribution_metrics(args, real, fake, cache, computed):
    """FID (and its eigvals cross-check) and KID on Inception features."""
    fr, ff = inception_sets(args, real, fake, cache, computed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid = metrics.fid(fr, ff)
    # another route to the same
    cross = metrics.frechet_distance_eigvals(*metrics.stats(fr), *metrics.stats(ff))
    kid = metrics.kernel_distance(ff, fr)  # generated first, as torch-fidelity's input1
    impl = f"pytorch-fid Inception-v3 weights ({Path(args.inception).name}), resize {args.resize}"
    return {
        "fid": dict(
            value=fid,
            eigvals_form=cross,
            implementation=impl,
            n_real=len(fr),
            n_fake=len(ff),
            notes=[str(w.message) for w in caught],
        ),
        "kid": dict(
            value=kid["mean"],
            std=kid["std"],
            subset_size=kid["subset_size"],
            subsets=100,
            implementation=impl,
        ),
    }


def coverage_metrics(args, real, fake, cache, computed):
    """Precision and recall (k = 3) on the same Inception features."""
    pr = metrics.precision_recall(*inception_sets(args, real, fake, cache, computed))
    impl = f"pytorch-fid Inception-v3 weights ({Path(args.inception).name}), resize {args.resize}"
    return {
        "precision": dict(value=pr["precision"], k=pr["k"], implementation=impl),
        "recall": dict(value=pr["recall"], k=pr["k"], implementation=impl),
    }


def clip_metrics(args, real, fake, captions, real_captions, cache):
    """CLIP score of each generated image with its caption (and of the real images, the reference),
    and CMMD."""
    if args.clip[0] == clipnet.HF:  # a Hugging Face folder: the same functions in hf_clip
        embed = hf_clip
        net = hf_clip.load_hf_clip(args.clip[1], device=args.device)
        files = list(net.files)
    else:
        embed = clipnet
        net = clipnet.load_clip(*args.clip, device=args.device)
        files = [args.clip[1]]
    key = metrics.cache_key([*real.paths, *files], arch=args.clip[0])
    er = metrics.cached_features(
        cache, "clip", key, lambda: embed.image_embeddings(net, real.batches(args.batch))
    )
    ef = embed.image_embeddings(net, fake.batches(args.batch))
    return {
        "clip_score": dict(
            value=clipnet.clip_score(ef, embed.text_embeddings(net, captions)),
            real_images=clipnet.clip_score(er, embed.text_embeddings(net, real_captions)),
            implementation=f"100 * max(cos, 0), {net.name}",
        ),
        "cmmd": dict(
            value=metrics.clip_mmd(er, ef), implementation=f"RBF sigma 10 x1000, {net.name}"
        ),
    }


def cls_metrics(args, images, jobs, classes):
    """Zero-shot Cls-OA over the test images that have a class (RSICD's numeric names have none) and
    their generated images."""
    index = {c: i for i, c in enumerate(classes)}
    labelled = [i for i, im in enumerate(images) if im.label is not None]
    gen = ImageFiles(
        [jobs[args.n * i + k][0] for i in labelled for k in range(args.n)], size=args.cls_size
    )
    test = ImageFiles([images[i].path for i in labelled], size=args.cls_size)
    labels = [index[images[i].label] for i in labelled]
    r = classifier.zero_shot_cls(
        gen,
        [c for c in labels for _ in range(args.n)],
        test,
        labels,
        classes,
        init=args.resnet_init,
        **cls_settings(args),
    )
    unlabelled = (
        f", {len(images) - len(labelled)} test images without a class left out"
        if len(labelled) < len(images)
        else ""
    )
    return cls_report(
        r,
        f"ResNet-18, {r['init']}, {r['epochs']} epochs, Adam {r['lr']:g}, batch "
        f"{r['batch_size']}, {r['size']} px{unlabelled}",
    )


def cls_settings(args):
    """The Cls-OA classifier's training settings (--cls-*), either protocol's."""
    return dict(
        epochs=args.cls_epochs,
        batch_size=args.cls_batch,
        lr=args.cls_lr,
        size=args.cls_size,
        seed=args.seed,
        progress=True,
        device=args.device,
    )


def cls_report(r, implementation):
    """The report's cls_oa entry of a zero-shot result r (either protocol's)."""
    return {
        "cls_oa": dict(
            value=r["oa"],
            aa=r["aa"],
            per_class=r["per_class"],
            n_train=r["n_train"],
            n_test=r["n_test"],
            implementation=implementation,
        )
    }


def mhn_fid_metrics(args, inception, images, jobs):
    """Txt2Img-MHN's FID and IS through their fine-tuned Inception: on their list files, else on
    1000 real test images and 1000 generated images drawn with fixed seeds."""
    if args.mhn_fid_lists:
        root = Path(args.image_root) if args.image_root else images[0].path.parent
        real = mhn.read_list(args.mhn_fid_lists[0], root)
        fake = mhn.read_list(args.mhn_fid_lists[1], Path(args.out) / "generated")
        sets = "their lists " + ", ".join(Path(f).name for f in args.mhn_fid_lists)
    else:
        real = mhn.draw([im.path for im in images], seed=0)
        fake = mhn.draw([path for path, _ in jobs], seed=1)
        sets = f"{len(real)} real and {len(fake)} generated images drawn (seeds 0, 1)"
    r = mhn.fid_and_is(mhn.load_inception(inception), real, fake, device=args.device)
    impl = f"Txt2Img-MHN: RSICD-tuned Inception-v3 {Path(inception).name}, 256 px, {r['route']}"
    return {
        "fid": dict(
            value=r["fid"], implementation=impl, n_real=r["n_real"], n_fake=r["n_generated"]
        ),
        "is": dict(
            value=r["is_generated"],
            real_images=r["is_real"],
            implementation=f"{impl}, one split; FID sets: {sets}",
        ),
    }


def mhn_clip_metrics(args, jobs):
    """Txt2Img-MHN's CLIP score: clip-rsicd-v2's unnormalised dot product of every generated image
    with its test image's first caption (evaluation/hf_clip.py)."""
    net = hf_clip.load_hf_clip(args.clip[1], device=args.device)
    captions = [mhn.caption(job.text) for _, job in jobs]
    value = hf_clip.clip_dot_score(net, [path for path, _ in jobs], captions, args.batch)
    return {
        "clip_score": dict(
            value=value,
            implementation=f"Txt2Img-MHN: image . text (unnormalised), {net.name}, "
            "transformers 4.27's preprocessing",
        )
    }


def mhn_cls_metrics(args, images, jobs, classes):
    """Txt2Img-MHN's zero-shot Cls-OA: their ResNet-18 (evaluation/mhn.py) trained on the
    generated images of the test images that have a class, read as their code reads files."""
    labelled = [i for i, im in enumerate(images) if im.label is not None]
    names = mhn.CLASSES if {images[i].label for i in labelled} <= set(mhn.CLASSES) else classes
    labels = [names.index(images[i].label) for i in labelled]
    r = mhn.zero_shot(
        [jobs[args.n * i + k][0] for i in labelled for k in range(args.n)],
        [c for c in labels for _ in range(args.n)],
        [images[i].path for i in labelled],
        labels,
        args.resnet_init,
        classes=tuple(names),
        **cls_settings(args),
    )
    return cls_report(
        r,
        f"Txt2Img-MHN: ResNet-18, {r['init']}, {r['epochs']} epochs, Adam {r['lr']:g}, batch "
        f"{r['batch_size']}, Resize(({r['size']}, {r['size']})), "
        f"{len(images) - len(labelled)} test images without a class left out",
    )


def mhn_deviations(args, size, inception):
    """What in this --protocol mhn run differs from Txt2Img-MHN's own evaluation of RSICD."""
    out = []
    if not str(args.test).endswith(".json"):
        out.append(f"test set {args.test} (theirs: RSICD, every image not in train)")
    elif args.split != mhn.NOT_TRAIN:
        out.append(f"test set: split {args.split} (theirs: every RSICD image not in train)")
    if args.n != 10:
        out.append(f"{args.n} images per test image (theirs: 10)")
    if list(size) != [mhn.SIZE, mhn.SIZE]:
        out.append(f"generated at {size[0]} x {size[1]} px (theirs: 256)")
    if inception and not args.mhn_fid_lists:
        out.append("FID sets drawn here: their RSICD_test.txt / RSICD_gen.txt not given")
    cls = (args.cls_epochs, args.cls_batch, args.cls_lr, args.cls_size)
    if cls != (5, 64, 1e-4, mhn.SIZE):
        out.append(f"Cls-OA epochs / batch / lr / size {cls} (theirs: 5, 64, 0.0001, 256)")
    if not args.resnet_init:
        out.append("Cls-OA ResNet-18 from scratch (theirs: ImageNet weights, --resnet-init)")
    if inception:
        info = json.loads(read_metadata(inception).get("info", "{}"))
        if info and (info.get("epochs"), info.get("n_train")) != (10, 9000):
            out.append(
                f"Inception fine-tuned here: {info.get('n_train')} images, {info.get('epochs')} "
                f"epochs from {info.get('init')} (theirs: 9000 images, 10 epochs; their network "
                "was never released, so every FID of this protocol approximates theirs)"
            )
    return out


def fit_mhn_inception(args, out, p):
    """OUT/mhn_inception.safetensors: their Inception fine-tuned from --fit-mhn-inception's ImageNet
    weights on --mhn-train (or the json's train split), reused when made the same way."""
    path = out / "mhn_inception.safetensors"
    try:
        if args.mhn_train:
            root = Path(args.image_root) if args.image_root else Path(args.test).parent / "images"
            files = mhn.read_list(args.mhn_train, root)
            source = args.mhn_train
        else:
            train = load_testset(args.test, "train", args.image_root)[0]
            files, source = [im.path for im in train], f"{args.test} (train)"
    except ValueError as e:
        p.error(f"--fit-mhn-inception: {e} (give --mhn-train LIST or a Karpathy json --test)")
    labelled = [f for f in files if mhn.class_index(f.name) is not None]
    recipe = dict(
        init=Path(args.fit_mhn_inception).name,
        trained_on=str(source),
        n_train=len(labelled),
        epochs=args.mhn_epochs,
        seed=args.seed,
    )
    if path.is_file():
        info = json.loads(read_metadata(path).get("info", "{}"))
        if all(info.get(k) == v for k, v in recipe.items()):
            print(f"mhn inception: {path} (fine-tuned on {source})")
            return path
    if len(labelled) < 2:
        p.error(f"--fit-mhn-inception: {source} holds {len(labelled)} images of RSICD's classes")
    print(f"mhn inception: fine-tuning on {len(labelled)} images of {source}")
    net = mhn.fit_inception(
        labelled,
        [mhn.class_index(f.name) for f in labelled],
        args.fit_mhn_inception,
        epochs=args.mhn_epochs,
        seed=args.seed,
        progress=True,
        device=args.device,
    )
    mhn.save_inception(net.cpu(), path, recipe)
    return path


def level_metrics(args, level_net, fake, asked, fake_names):
    """Resolution accuracy of the generated images by the level net; with a probe also the class it
    reads."""
    is_net = read_metadata(level_net).get("format") == classifier.FORMAT
    out = {}
    if is_net:
        net, info = classifier.load_net(level_net)
        if info["kind"] != "levels":
            raise ValueError(f"--level-net {level_net}: a scene classifier, not a level net")
        pred = classifier.predict_levels(net.to(args.device), fake)
    else:
        probe = load_probe(level_net)
        # (class, level) per batch
        read = [probe.predict(torch.stack(b)) for b in fake.batches(256)]
        cls, pred = torch.cat([c for c, _ in read]), torch.cat([lv for _, lv in read])
        # the probe's own classes
        if fake_names is not None and set(fake_names) <= set(PROCEDURAL_CLASSES):
            read = [PROCEDURAL_CLASSES[c] for c in cls.tolist()]
            out["probe_class"] = dict(
                value=sum(a == b for a, b in zip(read, fake_names)) / len(read),
                implementation=f"probe {Path(level_net).name}",
            )
    r = classifier.resolution_accuracy(pred, torch.as_tensor(asked))
    out["level"] = dict(
        value=r["exact"],
        within_one=r["within_one"],
        corr=metrics.finite_or_none(r["corr"]),
        n=r["n"],
        implementation=f"{'level net' if is_net else 'probe'} {Path(level_net).name}",
    )
    return out


def fit_level_net(args, path, size):
    """The level net at `path` trained on --fit-level-net's images at the generated `size`
    (procedural objects have a physical size, so both sets must be seen at the same pixel scale),
    ResNet-18 over integer levels with the --cls-* settings; a net already there is reused when it
    was trained the same way."""
    recipe = {
        "trained_on": args.fit_level_net,
        "render_size": size,
        "size": args.cls_size,
        "max_images": args.level_images,
        "epochs": args.cls_epochs,
        "lr": args.cls_lr,
        "batch_size": args.cls_batch,
        "seed": args.seed,
    }
    if path.is_file() and all(classifier.load_net(path)[1].get(k) == v for k, v in recipe.items()):
        print(f"level net: {path} (trained on {args.fit_level_net})")
        return path
    images, levels = level_images(args.fit_level_net, size, args.level_images)
    print(
        f"level net: {len(images)} images of levels {levels.min():g}..{levels.max():g} "
        f"from {args.fit_level_net}"
    )
    net = classifier.train_level_net(
        list(images),
        levels,
        **cls_settings(args),
    )
    classifier.save_net(net.cpu(), path, {**recipe, "images": len(images)})
    return path


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------


def test_set(args, values, out, recorded, p):
    """(size, images, classes, levels, jobs): the generated size, the test images (the first
    --limit), their classes, each one's level (its own, else --level) and the (path, cli.Job) of
    every image to generate from its caption."""
    try:
        if args.size:
            size = list(args.size)
        elif args.weights is None:  # the size the images in place were made at
            size = recorded.get("size") or [256, 256]
        else:
            size = [trained_size(args.weights) or 256] * 2
        # procedural scenes rendered at the generated size
        images, found = load_testset(
            args.test,
            args.split,
            args.image_root,
            out=out / "real" / f"{size[0]}px",
            size=size[0],
            places=args.places,
        )
        images = [
            im for im in images if in_split(im.fields.get("lat"), im.fields.get("lon"), args.places)
        ]
        if not images:
            raise ValueError(f"test set {args.test}: no images in --places {args.places}")
        classes = check_classes(found, args.classes)
    except (ValueError, WeightsError) as e:
        p.error(str(e))
    images = images[: args.limit] if args.limit else images
    levels = [im.level if im.level is not None else values.get("level") for im in images]
    gen = out / "generated"
    jobs = [
        (
            gen / f"{im.key}_{k}.png",
            cli.Job(im.caption, {**values, "level": lv}, args.seed + args.n * i + k),
        )
        for i, (im, lv) in enumerate(zip(images, levels))
        for k in range(args.n)
    ]
    return size, images, classes, levels, jobs


def own_values(model_cfg, fields):
    """{condition: value} of the conditions besides the text and the level whose every field a
    test image gives (its place: "lat", "lon"); these win over the flags' values."""
    out = {}
    for name in model_cfg.unet.embedded_conditions():
        names = model_cfg.conditions[name].field_names()
        if name != "level" and all(fields.get(f) is not None for f in names):
            out[name] = fields[names[0]] if len(names) == 1 else tuple(fields[f] for f in names)
    return out


def generate_test_images(args, p, values, jobs, images, size, gen):
    """(jobs, settings): the --weights model loaded and checked, the images not in `gen` yet
    generated; each job at its test image's level and place (own_values) where the model reads
    them."""
    model = cli.load_checked(args, p, text_to_image=True)
    cli.check_values(values, model.cfg, args.weights, p)
    # the test images' own levels and places, where the model reads them
    reads = model.cfg.condition_names()
    jobs = [
        (
            path,
            cli.Job(
                job.text,
                {
                    **{k: v for k, v in job.values.items() if k in reads},
                    **own_values(model.cfg, images[i // args.n].fields),
                },
                job.seed,
            ),
        )
        for i, (path, job) in enumerate(jobs)
    ]
    guidance = cli.guidance_scales(args, model.cfg)
    if "level" in reads and any(job.values.get("level") is None for _, job in jobs):
        p.error(
            f"{args.test} gives no level for its images: pass --level or --resolution-m (0 = none)"
        )
    if size[0] % model.vae.downsample or size[1] % model.vae.downsample:
        p.error(f"--size {size[0]} {size[1]}: must be multiples of {model.vae.downsample}")
    settings = settings_of(args, size, values, model.cfg)
    # every process checks the folder before any writes; rank 0 records the settings
    write = distributed.rank_and_world()[0] == 0
    cli.check_resume(gen, settings, args.regenerate, p, flag="--regenerate", write=write)
    generate_missing(model.eval(), guidance, jobs, args, size)
    return jobs, settings


def check_generated(args, p, recorded, jobs, gen):
    """Without --weights: the images in `gen` must all exist, made for the same test set; returns
    the settings they were generated with (their generation.json, {} if none)."""
    differ = [k for k in ("test", "split", "n") if k in recorded and recorded[k] != vars(args)[k]]
    if differ:
        p.error(
            f"{gen} was generated with other {', '.join(differ)} "
            f"({', '.join(str(recorded[k]) for k in differ)}) than asked"
        )
    missing = [j[0] for j in jobs if not j[0].exists()]
    if missing:
        p.error(
            f"without --weights the generated images must exist: {len(missing)} of {len(jobs)} "
            f"missing, e.g. {missing[0]}"
        )
    return recorded


def level_net_of(args, out, size, p):
    """The level net or probe to score resolution with: --level-net, or the one --fit-level-net
    trains (OUT/level_net.safetensors); None: neither given."""
    if not args.fit_level_net:
        return args.level_net
    try:
        return str(fit_level_net(args, out / "level_net.safetensors", size[0]))
    except (ValueError, WeightsError) as e:
        p.error(str(e))


def measure(args, nets, images, jobs, classes, levels, size, cache):
    """(results, skipped, failed): every metric of the protocol whose network is given (`nets`:
    the level net and mhn's Inception, paths or None); one that fails is reported and the others
    are still measured."""
    level_net, inception = nets
    real, fake = (
        ImageFiles([im.path for im in images]),
        ImageFiles([path for path, _ in jobs], size=size[0]),
    )
    captions = [job.text for _, job in jobs]
    labelled = all(im.label for im in images)
    fake_names = [im.label for im in images for _ in range(args.n)] if labelled else None
    computed = {}  # features several metrics share
    ours = [
        (
            "fid",
            args.inception,
            "--inception",
            lambda: distribution_metrics(args, real, fake, cache, computed),
        ),
        (
            "precision_recall",
            args.inception,
            "--inception",
            lambda: coverage_metrics(args, real, fake, cache, computed),
        ),
        (
            "clip",
            args.clip,
            "--clip",
            lambda: clip_metrics(args, real, fake, captions, [im.caption for im in images], cache),
        ),
        (
            "cls",
            classes and len(classes) > 1,
            "two classes or more in the test set",
            lambda: cls_metrics(args, images, jobs, classes),
        ),
    ]
    theirs = [
        (
            "fid",
            inception,
            "--mhn-inception or --fit-mhn-inception",
            lambda: mhn_fid_metrics(args, inception, images, jobs),
        ),
        (
            "clip",
            args.clip,
            "--clip hf:FOLDER (clip-rsicd-v2)",
            lambda: mhn_clip_metrics(args, jobs),
        ),
        (
            "cls",
            classes and len(classes) > 1,
            "two classes or more in the test set",
            lambda: mhn_cls_metrics(args, images, jobs, classes),
        ),
    ]
    steps = [
        *(theirs if args.protocol == "mhn" else ours),
        (
            "level",
            level_net and all(lv for lv in levels),
            "--level-net and known levels",
            lambda: level_metrics(
                args, level_net, fake, [job.values["level"] for _, job in jobs], fake_names
            ),
        ),
    ]
    if args.realism:  # asked for, or not at all: it needs no network
        steps.append(
            (
                "realism",
                True,
                "--realism",
                lambda: realism_metrics(args, images, jobs, classes, size, cache.parent),
            )
        )
    results, skipped, failed = {}, {}, {}
    for name, needed, flag, run in steps:
        if not needed:
            skipped[name] = f"needs {flag}"
            continue
        print(f"metrics: {name}")
        try:
            results.update(run())
        except (WeightsError, ValueError) as e:  # the others are still measured and reported
            failed[name] = str(e)
    return results, skipped, failed


def write_report(report, report_json, report_md):
    """report.json and report.md (the table), each written atomically; the table printed."""
    report_json.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (report_json, json.dumps(report, indent=1)),
        (report_md, evaluation_table(report)),
    ):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(report_md.read_text())


def main(argv=None):
    args, p, values = parse_args(argv)
    out = Path(args.out)
    gen, report_json, report_md = out / "generated", out / "report.json", out / "report.md"
    if report_json.exists() and not args.overwrite:
        p.error(
            f"{report_json} exists (the evaluation in {out} is complete); "
            "pass --overwrite to recompute it"
        )
    record = gen / "generation.json"
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    # under torchrun every process generates its share; the metrics and the report are rank 0's
    with distributed.processes(args.device) as (rank, _):
        with distributed.rank0_first():  # a procedural test set is rendered once, by rank 0
            size, images, classes, levels, jobs = test_set(args, values, out, recorded, p)
        if args.weights is not None:
            jobs, settings = generate_test_images(args, p, values, jobs, images, size, gen)
        else:
            settings = check_generated(args, p, recorded, jobs, gen)
    if rank:
        return 0
    level_net = level_net_of(args, out, size, p)
    inception = fit_mhn_inception(args, out, p) if args.fit_mhn_inception else args.mhn_inception
    results, skipped, failed = measure(
        args, (level_net, inception), images, jobs, classes, levels, size, out / "cache"
    )
    report = {
        "weights": args.weights or settings.get("weights"),
        "protocol": args.protocol,
        "deviations": mhn_deviations(args, size, inception) if args.protocol == "mhn" else [],
        "test": str(args.test),
        "split": args.split,
        "n_test": len(images),
        "n_generated": len(jobs),
        "classes": classes,
        "generation": settings,
        "metrics": results,
        "skipped": skipped,
        "failed": failed,
    }
    write_report(report, report_json, report_md)
    if failed:
        p.error(
            "; ".join(f"{k}: {v}" for k, v in failed.items())
            + f" (the other metrics are in {report_json})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
