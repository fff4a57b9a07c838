"""The embedded default, end to end on a CPU with no downloads:
procedural Earth -> trained model -> images.

    # ~10 minutes on 2 CPU cores, nearly all of it for the Text2Earth U-Net
    python demo.py
    # the VAE and the probe trained in the run too, inside the same budget
    python demo.py --from-scratch
    # the shortened from-scratch run CI uses (fixed steps, no budget)
    python demo.py --fast
    # remake the two files the default run starts from
    python demo.py --train-vae --train-probe
    # your captioned images instead (a Karpathy json): all trained from scratch, then evaluate.py
    # on its test split; ~30 minutes on 2 CPU cores for UCM-Captions at 64 px (docs/real.md)
    python demo.py --data=../shared/data/ucm_captions/dataset.json

As Text2Earth trains its U-Net on a frozen pretrained VAE, the default run starts from two small
files in configs/pretrained/, checked against the content hash that configs/pretrained/manifest.json
records with their recipe and figures: the procedural-Earth KL-VAE and the conditioning probe
(evaluation/probe.py, an evaluation network, like FID's Inception). It renders training scenes of
the procedural Earth (data/synthetic/) once into shards, encodes them into latent shards, trains a
tiny U-Net with a small text tower on those (`train.py --config configs/demo_unet.py`) for what the
time budget (`--minutes`) leaves once the scoring, timed before training, is reserved
(`--unet_steps=N` fixes the steps instead), then samples 108 prompts (12 classes x 9 levels) x
`eval_seeds` and measures with the probe how often a sample shows the class its prompt asked for
(text adherence) and the level asked for (resolution control), beside the same figures for real
renders (the ceiling) and unconditional samples (the floor). Every stage resumes: rerun the command
after an interruption. OUT/ gets model.safetensors (for `sample.py --weights`), overview.png
(samples beside the real renders of their prompts, the figures, then an inpainting, a cloud removal
and a canvas by edit.py's procedures), grid.png and results.json (figures, each stage's steps and
seconds, the true total time).

Options are `--key=value` for the fields of DemoConfig below (a bare `--flag` sets a boolean),
type-checked.
"""

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.levels import resolution_from_level
from data.datasets import KarpathyCaptions
from data.shards import ShardDataset, write_once, write_shards
from data.synthetic import CLASSES, InOrder, ProceduralEarth, sample as procedural_sample
from data.transforms import image_grid, tensor_to_pil, train_transform
from evaluation.probe import (
    evaluate_probe,
    fit_probe,
    load_probe,
    load_probe_info,
    make_probe_data,
    save_probe,
)
from evaluation.realism import FilesAsTrained
from evaluation.testset import karpathy
from evaluation.globe import place_figures, place_for_class, places_in, places_strip
from evaluation.report import overview_page, results_table
from evaluation.showcase import editing_strip, stack_images
from model import conditions
from trainer.checkpoint import checkpoint_paths, checkpoint_step, finished
from model.config import configure, load_config, usage
from model.flops import cpu_name, usable_cores
from model.pipeline import generate, sampling_seconds
from model.text2earth import Text2Earth
from model.weights import (
    WeightsError,
    check_recorded,
    load_model,
    load_part,
    manifest_of,
    record_file,
    save_model,
    sha256,
)

GRID_LEVELS = (11, 13, 15, 17)
# the CI run: 600 U-Net steps do not learn the place (TV 0.86 with it, 0.87 without) and its
# silent captions cost them level control, so its scenes have no place
FAST = dict(
    vae_steps=600,
    unet_steps=600,
    pool=4000,
    probe_train_images=2160,
    probe_steps=1000,
    located=False,
)
# --data: the recipe's own configs and budget (docs/real.md)
REAL = dict(
    vae_config="configs/real_vae.py",
    unet_config="configs/real_unet.py",
    minutes=30.0,
    vae_share=0.3,
)
PRETRAINED = Path("configs/pretrained")
# held-out renders (make_probe_data) the shipped VAE's error is recorded on
VAE_HELD = dict(n=216, seed=3)


@dataclass
class DemoConfig:
    out: str = "out/demo"
    vae_config: str = "configs/demo_vae.py"
    unet_config: str = "configs/demo_unet.py"
    vae: str = str(PRETRAINED / "demo_vae.safetensors")  # the frozen VAE the U-Net trains on ...
    probe: str = str(PRETRAINED / "demo_probe.safetensors")  # ... and the probe that scores it
    from_scratch: bool = False  # train the VAE and the probe in this run instead (as --fast does)
    # make `vae` (configs/demo_vae.py, its fixed steps), record it, and stop
    train_vae: bool = False
    train_probe: bool = False  # make `probe` (on `vae`), record it, and stop
    # the shortened from-scratch run CI uses: the FAST steps and sizes, no budget
    fast: bool = False
    minutes: float = 9.5  # time budget of the whole run; every stage is sized to fit it
    # > 0: train the U-Net exactly this many steps (a run that repeats anywhere)
    unet_steps: int = 0
    vae_steps: int = 0  # > 0: instead of the VAE stage's max_steps
    pool: int = 8000  # training scenes, rendered once (image shards), VAE-encoded once (latents)
    seed: int = 0  # the training scenes, every initialisation and noise draw (train.py's seed)
    eval_seeds: int = 3  # samples per (class, level) prompt: 324 in all, standard error ~2.2 points
    # the conditioning probe: renders it trains on (half through the VAE) ...
    probe_train_images: int = 6480
    probe_steps: int = 4000  # ... and its optimisation steps
    cfg: float = 3.0  # guidance scale of the text (and of the level, unless level_cfg differs)
    level_cfg: float = 6.0  # guidance scale of the level on its own (model/guidance.py)
    location_cfg: float = 3.0  # and of the location (when the model reads one)
    # places of the globe the location is judged at, half in held-out regions, ...
    globe_places: int = 12
    globe_samples: int = 16  # ... with this many samples at each (evaluation/globe.py)
    steps: int = 20  # DPM-Solver++(2M) steps per sample
    # scenes at places of the globe, as the U-Net config says (synthetic_located); False: none,
    # every caption naming its class, a model without the place embedding, no scoring of the place
    located: bool = True
    overwrite: bool = False  # replace a finished demo in `out`
    # a Karpathy caption json (UCM-Captions, RSICD, Sydney-Captions): the recipe for real imagery
    # instead (docs/real.md): all trained here on its train split, evaluated on its test split
    data: str = ""
    vae_share: float = 0.4  # a from-scratch VAE's share of the budget left when it starts
    image_size: int = 0  # --data: the images' size for both stages (0: the configs', 64)
    eval_n: int = 4  # --data: images generated per test image
    cls_epochs: int = 10  # --data: epochs of the zero-shot Cls-OA classifier
    realism_steps: int = 1500  # --data: steps of the realism feature net (evaluate.py --realism)


def parse_args(argv):
    """DemoConfig from --key=value overrides (and an optional --config FILE of plain values), FAST
    under --fast."""
    argv = list(argv)
    cfg = configure(DemoConfig(), argv)
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if cfg.fast or cfg.data:
        for k, v in (REAL if cfg.data else FAST).items():
            if k not in given:
                setattr(cfg, k, v)
        cfg.from_scratch = True
    if cfg.data:
        check_real_data(cfg.data)
    if cfg.image_size and (not cfg.data or cfg.image_size % 16):
        raise ValueError(
            f"--image_size={cfg.image_size}: takes --data and a multiple of 16 (the procedural "
            "demo's size is its stage configs')"
        )
    for key in (
        "pool",
        "eval_seeds",
        "probe_train_images",
        "probe_steps",
        "steps",
        "globe_places",
        "eval_n",
        "cls_epochs",
        "realism_steps",
    ):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    if (
        cfg.minutes <= 0
        or cfg.unet_steps < 0
        or cfg.vae_steps < 0
        or cfg.cfg < 0
        or cfg.level_cfg < 0
        or cfg.location_cfg < 0
        or cfg.globe_samples < 1
        or not 0 < cfg.vae_share < 1
    ):
        raise ValueError(
            "--minutes must be > 0, --unet_steps and --vae_steps >= 0, the guidance scales >= 0, "
            "--globe_samples >= 1, --vae_share in (0, 1)"
        )
    for path in (cfg.vae_config, cfg.unet_config):
        if not Path(path).is_file():
            raise ValueError(f"stage config {path} does not exist")
    remake = (
        "remake it with `python demo.py --train-vae --train-probe` or restore it with git, "
        "or run --from-scratch"
    )
    if not (cfg.from_scratch or cfg.train_vae or cfg.train_probe):
        check_recorded(cfg.vae, remake)
        check_recorded(cfg.probe, remake)
    elif cfg.train_probe and not cfg.train_vae:
        check_recorded(cfg.vae, remake)
    return cfg


def eval_targets(size, levels=(10, 18), seed=10_000):
    """One prompt per (class, integer level): the caption of a held-out procedural scene of that
    class, seen size x size pixels (the caption tells what that frame shows), with that scene's
    image (H, W, 3 uint8) and a place of the globe where the world shows that class."""
    targets = []
    for c in range(len(CLASSES)):
        for level in range(levels[0], levels[1] + 1):
            s = procedural_sample(seed + 100 * c + level, level=float(level), size=size, cls=c)
            place = place_for_class(c, np.random.default_rng([seed, c, level]))
            targets.append((s["caption"], float(level), c, s["image"], place))
    return targets


def reads_location(model_cfg, args):
    """Whether the demo's model reads a location (configs/demo.py) and its scenes have places."""
    return "location" in model_cfg.condition_names() and args.located


def guidance_of(model_cfg, args):
    """The demo's guidance: the text at --cfg, the level and the location at their own scales."""
    own = args.location_cfg if "location" in model_cfg.condition_names() else None
    return conditions.scales(model_cfg, args.cfg, level=args.level_cfg, location=own)


def scenes(stage_file, n, seed=0):
    """The procedural scenes a stage config trains on: ProceduralEarth's arguments (its image size
    and levels)."""
    values = vars(load_config(stage_file))
    missing = [
        key
        for key in ("image_size", "synthetic_levels", "synthetic_integer_levels")
        if key not in values
    ]
    if missing:
        raise ValueError(f"{stage_file}: the demo needs {missing} there (the scenes it trains on)")
    spec = dict(
        n=n,
        size=values["image_size"],
        levels=list(values["synthetic_levels"]),
        seed=seed,
        integer_levels=values["synthetic_integer_levels"],
    )
    if values.get("synthetic_located"):  # at places of the globe, some captions silent
        spec.update(
            located=True,
            places=values.get("places", "all"),
            omit_class=values.get("synthetic_omit_class", 0.0),
        )
    return spec


def run_stage(stage_file, out_dir, max_steps, *overrides, beside=None):
    """One training stage: train.py in a process of its own, as a user would run it (max_steps: 0 =
    the stage config's). An interruption (Ctrl-C, SIGTERM) reaches it too: it saves a checkpoint and
    stops, and rerunning the demo resumes it. beside: a process (the probe) that has one core to
    itself; the stage runs on the others until it ends, then is stopped and resumed on all of them
    (a checkpoint and an exact resume: a second thread on the same core would cost both jobs far
    more than it gives). Returns the stage's wall seconds."""
    t0 = time.time()
    max_steps, cores = max_steps or load_config(stage_file).max_steps, usable_cores()
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("train.py")),
        "--config",
        str(stage_file),
        f"--out_dir={out_dir}",
        f"--max_steps={max_steps}",
        *overrides,
    ]
    shared = beside is not None and beside.is_alive() and cores > 1
    proc = subprocess.Popen(cmd + ([f"--threads={cores - 1}"] if shared else []))
    # to the stage
    forward = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    while True:
        try:
            while shared and proc.poll() is None and beside.is_alive():
                beside.join(timeout=1.0)
            if shared and proc.poll() is None:  # the core is free: hand it over
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                shared = False
                proc = subprocess.Popen(cmd)
            code = proc.wait()
            break
        except KeyboardInterrupt:  # the stage got the signal too: let it save
            shared = False
    signal.signal(signal.SIGTERM, forward)
    if code != 0 or not finished(out_dir, max_steps):
        raise SystemExit(
            f"demo.py: the stage {stage_file} stopped (exit code {code}) in {out_dir}; "
            "run the same command again to resume"
        )
    return time.time() - t0


def render_pool(out_dir, spec, processes=1):
    """The demo's training scenes: the first n procedural samples (ProceduralEarth(**spec)),
    rendered once into lossless image shards in out_dir. The VAE trains on them, several epochs
    (rendering every batch anew would cost half as much again as the VAE step itself on two cores),
    and the U-Net on their latents. An out_dir already holding the same scenes is kept (resume);
    other contents are replaced. `processes` render at once."""
    write_once(
        out_dir,
        spec,
        lambda: write_shards(
            InOrder(ProceduralEarth(**spec), processes),
            out_dir,
            samples_per_shard=max(1, spec["n"] // 8),
            image_format="png",
            overwrite=True,
            progress=True,
        ),
    )


def encode_pool(vae_file, images_dir, out_dir):
    """The image shards of render_pool, encoded once by the VAE in vae_file (posterior means,
    scaled) into latent shards in out_dir: the U-Net then reads latents only. Kept on resume only if
    made from the same images by the same VAE weights."""
    spec = dict(
        images=json.loads((Path(images_dir) / "made_from.json").read_text()),
        vae_sha256=sha256(vae_file),
    )

    def write():
        vae = load_part(vae_file, "vae")
        images = ShardDataset(
            images_dir, rank=0, world_size=1, shuffle_buffer=0, shuffle_shards=False
        )
        write_shards(
            images,
            out_dir,
            samples_per_shard=max(1, spec["images"]["n"] // 8),
            batch_size=64,
            write_images=False,
            overwrite=True,
            progress=True,
            encode_fn=lambda x: vae.encode_latents(x, sample=False),
        )

    write_once(out_dir, spec, write)


def probe_job(size, n_train, steps, vae_file, vae_ready, out_file, deadline):
    """The conditioning probe of a from-scratch run, trained in a process of its own on one core
    while the U-Net trains on the others (on two cores the U-Net step gains only ~1.2x from its
    second thread; the probe ~1.2x too): waits for the run's VAE (vae_ready, a multiprocessing
    Event), trains on its renders, half of them through that VAE, for `steps` or fewer if they would
    not end by `deadline` (a time.time(); None: no limit), and writes out_file (save_probe). A probe
    already there, made on the same VAE, is kept (resume)."""
    torch.set_num_threads(1)
    vae_ready.wait()
    made_on = sha256(vae_file)
    if Path(out_file).exists() and load_probe_info(out_file).get("vae_sha256") == made_on:
        return  # made on this VAE before an interruption
    t0 = time.time()
    probe, results, steps = fit_probe(
        size, n_train, steps, load_part(vae_file, "vae").reconstruct, pace_deadline=deadline
    )
    save_probe(
        probe,
        out_file,
        {
            "results": results,
            "steps": steps,
            "minutes": (time.time() - t0) / 60,
            "vae_sha256": made_on,
        },
    )


# s kept beyond the timed sampling: U-Net start and save, scoring, editing examples, outputs
SAMPLING_MARGIN = 40
MIN_UNET_MINUTES = 1.0  # the U-Net trains at least this long, budget or not


def scoring_seconds(model_cfg, args, size, batch=54):
    """Seconds the scoring will take (eval_seeds x 108 prompted samples, as many unconditional),
    measured on an untrained model of the same architecture before training
    (model/pipeline.sampling_seconds)."""
    torch.manual_seed(0)
    model, n = Text2Earth(model_cfg).eval(), 108 * args.eval_seeds
    targets = eval_targets(size)[:batch]
    place = [t[4] for t in targets] if reads_location(model_cfg, args) else None
    prompted = conditions.request(
        model_cfg, batch, text=[t[0] for t in targets], level=14.0, location=place
    )
    if reads_location(model_cfg, args):  # and without the place; the silent prompt at places
        n = 2 * n + (args.globe_places + 1) * args.globe_samples
    unconditional = conditions.request(model_cfg, batch)
    return sampling_seconds(
        model, prompted, guidance_of(model_cfg, args), args.steps, n, size=(size, size)
    ) + sampling_seconds(
        model,
        unconditional,
        conditions.scales(model_cfg, 1.0),
        args.steps,
        108 * args.eval_seeds,
        size=(size, size),
    )


def started_budget(stage_dir):
    """The budget (minutes) a stage started with (its config.json), or None: a resumed stage keeps
    it."""
    started = Path(stage_dir) / "config.json"
    return json.loads(started.read_text())["max_minutes"] if started.exists() else None


def unet_budget(unet_dir, seconds_left, reserve):
    """Minutes of U-Net training: what is left of the demo's budget after `reserve` seconds
    (sampling and the rest), at least MIN_UNET_MINUTES; a resumed stage keeps the budget it started
    with."""
    minutes, started = (seconds_left - reserve) / 60, started_budget(unet_dir)
    if started is None and minutes < MIN_UNET_MINUTES:
        print(
            "demo.py: the time budget is spent before the U-Net; "
            f"it trains {MIN_UNET_MINUTES:g} min anyway"
        )
    return started or max(minutes, MIN_UNET_MINUTES)


def generate_all(model, prompts, levels, guidance, steps, size, places=None, batch=54):
    images = []
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        asked = conditions.request(
            model.cfg,
            j - i,
            text=prompts[i:j],
            level=levels[i:j],
            location=places[i:j] if places else None,
        )
        images.append(
            generate(
                model,
                asked,
                seeds=list(range(i, j)),
                steps=steps,
                guidance=guidance,
                size=(size, size),
            )
        )
    return torch.cat(images)


def make_pretrained(args, out, command):
    """--train-vae / --train-probe: the files the default run starts from, each entered in the
    manifest with its recipe and figures measured on held-out renders."""
    host = {"torch": torch.__version__, "cpu": cpu_name(), "cores": usable_cores()}
    size = load_config(args.unet_config).image_size
    if args.train_vae:
        spec = scenes(args.vae_config, args.pool, args.seed)
        render_pool(out / "images", spec, processes=min(usable_cores(), 8))
        run_stage(
            args.vae_config,
            out / "train_vae",
            args.vae_steps,
            "--data=shards",
            f"--data_path={out / 'images'}",
            f"--seed={args.seed}",
        )
        model = load_model(out / "train_vae" / "model.safetensors")
        save_model(model, args.vae, parts=("vae",), trained=("vae",))
        held = make_probe_data(size=size, **VAE_HELD)[0]
        l1 = (load_part(args.vae, "vae").reconstruct(held) - held).abs().mean().item()
        record_file(
            args.vae,
            {
                "command": command,
                "recipe": args.vae_config,
                "scenes": spec,
                "steps": checkpoint_step(checkpoint_paths(out / "train_vae")[-1]),
                **host,
                "held_out": {**VAE_HELD, "size": size, "l1": l1},
            },
        )
        print(f"wrote {args.vae}: held-out L1 {l1:.4f}")
    if args.train_probe:
        t0 = time.time()
        probe, results, steps = fit_probe(
            size, args.probe_train_images, args.probe_steps, load_part(args.vae, "vae").reconstruct
        )
        save_probe(
            probe, args.probe, {"results": results, "steps": steps, "vae_sha256": sha256(args.vae)}
        )
        record_file(
            args.probe,
            {
                "command": command,
                "vae_sha256": sha256(args.vae),
                "train_images": args.probe_train_images,
                "steps": steps,
                **host,
                "minutes": (time.time() - t0) / 60,
                "held_out": {"n": 540, "seed": 2, **results},
            },
        )
        print(f"wrote {args.probe}: " + json.dumps(results))


def fork_probe(args, size, vae_file, probe_file, deadline):
    """A from-scratch run's probe in a process of its own, forked now (the child runs torch on one
    thread only) and waiting for the run's VAE: (the process, the Event to set once vae_file is
    written)."""
    fork = multiprocessing.get_context("fork")
    vae_ready = fork.Event()
    job = fork.Process(
        target=probe_job,
        daemon=True,
        args=(
            size,
            args.probe_train_images,
            args.probe_steps,
            vae_file,
            vae_ready,
            probe_file,
            deadline,
        ),
    )
    job.start()
    return job, vae_ready


def model_overrides(args):
    """The stages' changes to their configs: without places (--located=False) no place embedding
    either, the model and its training draws those of the recipe without location; --image_size."""
    size = [f"--image_size={args.image_size}"] if args.image_size else []
    return size + ([] if args.located else ["--model.unet.place_conditions=()"])


def vae_stage(args, out, t0, budget):
    """A from-scratch run's VAE, trained on the image shards in out/images in out/vae (under a
    budget: the vae_share of what is left, fewer steps if slower); returns its stage record."""
    vae_args = ["--data=shards", f"--data_path={out / 'images'}", f"--seed={args.seed}"]
    vae_args += model_overrides(args)
    if budget is not None:
        left = budget - (time.time() - t0)
        share = started_budget(out / "vae") or args.vae_share * left / 60
        vae_args.append(f"--max_minutes={share}")
    seconds = run_stage(args.vae_config, out / "vae", args.vae_steps, *vae_args)
    return {"steps": checkpoint_step(checkpoint_paths(out / "vae")[-1]), "seconds": seconds}


def unet_stage(args, out, vae_file, t0, budget, reserve, probe):
    """The U-Net and text tower, trained on the latents in out/unet for what the budget leaves after
    `reserve` seconds (or args.unet_steps), beside the probe's process if any; returns its stage
    record."""
    unet_args = [
        "--data=shards",
        f"--data_path={out / 'latents'}",
        f"--init_from={vae_file}",
        f"--seed={args.seed}",
        *model_overrides(args),
    ]
    record = {}
    if budget is not None:
        minutes = unet_budget(out / "unet", budget - (time.time() - t0), reserve)
        unet_args.append(f"--max_minutes={minutes}")
        record = {"budget_minutes": minutes}
    seconds = run_stage(args.unet_config, out / "unet", args.unet_steps, *unet_args, beside=probe)
    return {
        **record,
        "steps": checkpoint_step(checkpoint_paths(out / "unet")[-1]),
        "seconds": seconds,
    }


def latents_and_unet(args, out, vae_file, timing, probe, stages):
    """The image shards in out/images encoded by the VAE into out/latents, then the U-Net stage on
    them (timing: (t0, budget, reserve) as unet_stage takes them; probe: the process beside it or
    None), its weights copied to out/model.safetensors; both stages' records go into `stages`."""
    print(f"encoding them with the VAE ({vae_file}) ...", flush=True)
    t = time.time()
    encode_pool(vae_file, out / "images", out / "latents")
    stages["encode"] = {"seconds": time.time() - t}
    stages["unet"] = unet_stage(args, out, vae_file, *timing, probe)
    shutil.copyfile(out / "unet" / "model.safetensors", out / "model.safetensors")


def train_models(args, out, t0, budget, cores, stages):
    """Stage 1: the scenes; the VAE (shipped, or trained now, the probe then beside the U-Net);
    latents; U-Net + text tower. Each step's record goes into `stages`. Returns (model, size,
    probe_file, job, reserve): job is the probe's process (None: the shipped probe), reserve the
    seconds kept for the scoring (None: fixed steps)."""
    spec = scenes(args.unet_config, args.pool, args.seed)  # the VAE's, at places of the globe
    if not args.located:
        spec = {k: v for k, v in spec.items() if k not in ("located", "places", "omit_class")}
    unet_cfg = load_config(args.unet_config)
    size = unet_cfg.image_size
    out.mkdir(parents=True, exist_ok=True)
    vae_file, probe_file, job = Path(args.vae), Path(args.probe), None
    if args.from_scratch:  # the probe's process, forked first, waits for the VAE
        vae_file, probe_file = out / "vae" / "model.safetensors", out / "probe.safetensors"
        deadline = None if budget is None else t0 + budget - 60
        job, vae_ready = fork_probe(args, size, vae_file, probe_file, deadline)
    print(f"rendering {args.pool} training scenes ...", flush=True)
    t = time.time()
    render_pool(out / "images", spec, processes=min(cores, 8))
    stages["render"] = {"scenes": args.pool, "seconds": time.time() - t}
    reserve = None  # seconds kept for the scoring, timed while the CPU is free
    if budget is not None:
        reserve = scoring_seconds(unet_cfg.model, args, size) + SAMPLING_MARGIN
    if args.from_scratch:
        stages["vae"] = vae_stage(args, out, t0, budget)
        vae_ready.set()
    else:
        steps = manifest_of(vae_file).get(vae_file.name, {}).get("steps")
        stages["vae"] = {"pretrained": str(vae_file), "steps": steps}
    latents_and_unet(args, out, vae_file, (t0, budget, reserve), job, stages)
    model = load_model(out / "model.safetensors").eval()
    return model, size, probe_file, job, reserve


def scoring_probe(probe_file, job, stages):
    """Stage 2: the probe, the shipped one or this run's (its process joined), and its figures on
    held-out renders (the ceilings: as made and through the VAE): (probe, results)."""
    if job is not None and job.join() is None and job.exitcode != 0:
        raise SystemExit(
            f"demo.py: the probe's process failed (exit code {job.exitcode}; traceback above)"
        )
    probe, info = load_probe(probe_file), load_probe_info(probe_file)
    made = {"pretrained": str(probe_file)} if job is None else {"seconds": 60 * info["minutes"]}
    stages["probe"] = {"steps": info["steps"], **made}
    return probe, dict(info["results"])


def sample_and_measure(args, model, probe, size, results, reserve, stages):
    """Stage 3: `eval_seeds` samples per (class, level), its prompt a held-out caption, and as many
    unconditional ones (the floor), scored by the probe into `results`: (targets, images)."""
    print("sampling and measuring ...", flush=True)
    start = time.time()
    targets = eval_targets(size) * args.eval_seeds
    prompts, levels = [t[0] for t in targets], [t[1] for t in targets]
    labels = torch.tensor([t[2] for t in targets])
    lv = torch.tensor(levels)
    guided = guidance_of(model.cfg, args)
    n, located = len(prompts), reads_location(model.cfg, args)
    places = [t[4] for t in targets] if located else None
    images = generate_all(model, prompts, levels, guided, args.steps, size, places)
    ours = f"generated, prompt + level{' + place' if located else ''} (ours)"
    results[ours] = evaluate_probe(probe, images, labels, lv)
    if located:  # the same prompts with no place
        plain = generate_all(model, prompts, levels, guided, args.steps, size)
        results["generated, prompt + level, no place"] = evaluate_probe(probe, plain, labels, lv)
    unguided = conditions.scales(model.cfg, 1.0)
    uncond = generate_all(model, [""] * n, [0.0] * n, unguided, args.steps, size)
    results["unconditional samples (floor)"] = evaluate_probe(probe, uncond, labels, lv)
    globe = located and place_stage(args, model, probe, size, guided)
    at_places = (args.globe_places + 2) * args.globe_samples if located else 0
    stages["sampling"] = {
        "images": (3 if located else 2) * n + at_places,
        "seconds": time.time() - start,
        "reserved_seconds": reserve,
    }
    return targets, images, globe


def place_stage(args, model, probe, size, guided):
    """The class-silent prompt at `globe_places` places, half in the regions training left out
    (evaluation/globe.py): {"train": figures, "held_out": figures, "shown": (train places' and
    held-out places' samples)}."""
    half = max(1, args.globe_places // 2)
    out, shown = {}, []
    for split, n in (("train", args.globe_places - half), ("held_out", half)):
        figures, samples = place_figures(
            model, probe, places_in(split, n, args.seed), args.globe_samples, size, guided,
            args.steps,
        )  # fmt: skip
        out[split] = figures
        shown.append((figures, samples))
    return {**out, "shown": shown}


def overview_rows(targets, images, per_class):
    """Every class at the GRID_LEVELS: (class name, [(real render, sample, prompt)]) per class;
    targets come in per_class levels from 10 a class."""
    picks = [[c * per_class + (level - 10) for level in GRID_LEVELS] for c in range(len(CLASSES))]
    return [
        (
            CLASSES[c].replace("_", " "),
            [
                (Image.fromarray(targets[i][3]), tensor_to_pil(images[i]), targets[i][0])
                for i in pick
            ],
        )
        for c, pick in enumerate(picks)
    ]


def overview_header(args, stages, t0, cores):
    """The overview's title lines: what was trained where, each stage's steps, the sampling."""
    made = "the U-Net and text tower trained here; VAE and probe " + (
        "trained here too"
        if args.from_scratch
        else "from configs/pretrained (python demo.py --train-vae --train-probe)"
    )
    trained = ", ".join(
        f"{name} {s['steps']} steps" for name, s in stages.items() if s.get("steps")
    )
    return [
        "text2earth demo: a tiny Text2Earth on the procedural Earth, 32 px, CPU only "
        f"({cores} cores); {made}",
        f"stages: {trained}; whole run {(time.time() - t0) / 60:.1f} min; "
        f"sampling: DPM-Solver++(2M) {args.steps} steps, "
        f"guidance text {args.cfg:g}, level {args.level_cfg:g}",
        "each pair: a real render and a sample generated from its caption (beneath); columns: "
        "Google map level L, resolution_m = 2^(17-L)",
    ]


def write_outputs(
    args, out, model, size, targets, images, results, globe, stages, t0, budget, cores
):
    """Stage 4: the overview (every class, four levels, the real render beside each sample; one
    prompt at places of the globe; editing), the grid, results.json; returns the summary written
    there."""
    per_class = len(range(10, 19))
    rows = overview_rows(targets, images, per_class)
    image_grid([g for _, row in rows[::2] for _, g, _ in row], cols=len(GRID_LEVELS)).save(
        out / "grid.png"
    )
    header = overview_header(args, stages, t0, cores)
    guided = guidance_of(model.cfg, args)
    # inpainting, cloud removal, a canvas: evaluation/showcase.py
    t, strip = time.time(), editing_strip(model, size, guided, args.steps)
    stages["editing"] = {"seconds": time.time() - t}
    if globe:  # one prompt at places of the globe, above the editing
        train, held = globe["shown"]
        strips = [
            places_strip(*train, size),
            places_strip(*held, size, held_out=True),
        ]
        strip = stack_images([*strips, strip])
    columns = [f"L{level} ({resolution_from_level(level):g} m/px)" for level in GRID_LEVELS]
    overview_page(out / "overview.png", header, columns, rows, results, footer=strip)
    elapsed = time.time() - t0
    summary = {
        "results": results,
        "globe": {k: v for k, v in (globe or {}).items() if k != "shown"},
        "total_minutes": elapsed / 60,
        "budget_minutes": args.minutes if budget else None,
        "stages": stages,
        "unet_steps": stages["unet"]["steps"],
        "cpu": cpu_name(),
        "cores": cores,
        **vars(args),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(results_table(results))
    for split, figures in summary["globe"].items():
        print(
            f"class-silent prompt at {len(figures['places'])} {split} places: TV to the world's "
            f"classes {figures['tv_place']:.3f} with the place, {figures['tv_no_place']:.3f} "
            f"without, {figures['tv_real']:.3f} for real renders (the floor)"
        )
    print(
        f"done in {elapsed / 60:.1f} min (U-Net {stages['unet']['steps']} steps): "
        f"{out / 'overview.png'}, {out / 'grid.png'}, weights {out / 'model.safetensors'}"
    )
    example = targets[3 * per_class + 6][0]
    print(
        f"try: python sample.py --weights {out / 'model.safetensors'} --size {size} {size} "
        f'--level 16 --cfg {args.cfg:g} --level-cfg {args.level_cfg:g} --prompt "{example}"'
    )
    return summary


# ----------------------------------------------------------------------------------------------
# --data: the recipe for a captioned set of real images (docs/real.md)
# ----------------------------------------------------------------------------------------------
# s of the evaluation beyond the timed sampling: three Cls-OA classifiers, the realism feature net
# and three two-sample tests, the VAE reconstructions, process starts (UCM at 64 px, 2 cores)
EVAL_SECONDS = 270
REAL_COLUMNS = 3  # test images shown per class in the overview
REAL_FIGURES = (
    ("Cls-OA", "cls_oa", "{:5.1%}"),
    ("C2ST acc.", "c2st", "{:5.1%}"),
    ("feature FID", "feature_fid", "{:6.2f}"),
)


def check_real_data(path):
    """--data must be a Karpathy caption json with a train and a test split."""
    if not Path(path).is_file():
        raise ValueError(f"--data {path}: no such file (a Karpathy caption json)")
    for split in ("train", "test"):
        karpathy(path, split)  # a ValueError names the file and the splits it has


def real_pool(data, out_dir, size, seed):
    """The train split of a Karpathy json, every caption its own sample (an image with 5 captions is
    5 samples), written once into lossless image shards at `size` px: the shorter side resized, a
    random crop, each copy under its own flip or rotation (train_transform, seeded per sample). The
    VAE trains on them and the U-Net on their latents. Kept on resume when made the same way.
    Returns (samples, images)."""
    reader = KarpathyCaptions(
        data, split="train", transform=train_transform(size), all_captions=True, seed=seed
    )
    spec = dict(data=str(Path(data).resolve()), split="train", size=size, seed=seed, n=len(reader))
    write_once(
        out_dir,
        spec,
        lambda: write_shards(
            reader,
            out_dir,
            samples_per_shard=max(1, len(reader) // 8),
            image_format="png",
            overwrite=True,
            progress=True,
        ),
    )
    return len(reader), len(reader.entries)


def real_eval_seconds(args, model_cfg, size, n_test, batch=64):
    """Seconds the evaluation will take: eval_n images per test image sampled by an untrained model
    of the architecture (timed), plus EVAL_SECONDS."""
    torch.manual_seed(0)
    model = Text2Earth(model_cfg).eval()
    asked = conditions.request(model_cfg, batch, text=["a scene"] * batch, level=0.0)
    sampling = sampling_seconds(
        model,
        asked,
        conditions.scales(model_cfg, args.cfg),
        args.steps,
        args.eval_n * n_test,
        size=(size, size),
    )
    return sampling + EVAL_SECONDS


def write_images(images, paths):
    """Save image tensors (3, H, W) in [-1, 1] as PNG files (their folders made)."""
    for x, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor_to_pil(x).save(path)


def reconstructions(vae_file, test, size, folder):
    """Each test image as the training data was made (realism.FilesAsTrained), through the VAE,
    into folder/{key}_0.png: the most a decoded sample can look like the real image."""
    vae = load_part(vae_file, "vae").eval()
    real = FilesAsTrained([im.path for im in test], size)
    paths = [folder / f"{im.key}_0.png" for im in test]
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = torch.stack([real[j] for j in range(i, min(i + 64, len(test)))])
            write_images(vae.reconstruct(batch).clamp(-1, 1), paths[i : i + 64])


def equal_count_real(data, test, n, size, folder):
    """For each test image, n training images of its class (a different one for each, in the
    json's order, reused only when the class has too few) as the training data was made, into
    folder/{key}_{k}.png: the images a zero-shot Cls-OA of real images at the same count trains on.
    Returns False when the test images have no classes."""
    by_class = {}
    for im in karpathy(data, "train"):
        by_class.setdefault(im.label, []).append(im.path)
    if any(im.label is None or im.label not in by_class for im in test):
        return False
    seen = {}
    for im in test:
        first, pool = seen.get(im.label, 0), by_class[im.label]
        seen[im.label] = first + n
        picked = [pool[(first + k) % len(pool)] for k in range(n)]
        real = FilesAsTrained(picked, size)
        write_images([real[k] for k in range(n)], [folder / f"{im.key}_{k}.png" for k in range(n)])
    return True


def run_evaluation(args, out, size, name, n, *extra):
    """evaluate.py on --data's test split in a process of its own, into out/name (skipped when its
    report exists): Cls-OA and realism (its feature net shared by every evaluation of the run, in
    out/realism_net.safetensors). Returns its report."""
    report = out / name / "report.json"
    if not report.exists():
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("evaluate.py")),
            "--test",
            args.data,
            "--out",
            str(out / name),
            "--n",
            str(n),
            "--size",
            str(size),
            str(size),
            "--seed",
            str(args.seed),
            "--cls-size",
            str(size),
            "--cls-epochs",
            str(args.cls_epochs),
            "--realism",
            "--realism-size",
            str(size),
            "--realism-net",
            str(out / "realism_net.safetensors"),
            "--realism-steps",
            str(args.realism_steps),
            *extra,
        ]
        code = subprocess.call(cmd)
        if code != 0 or not report.exists():
            raise SystemExit(
                f"demo.py: evaluate.py stopped (exit code {code}) in {out / name}; run the same "
                "command again to resume"
            )
    return json.loads(report.read_text())


def real_figures(reports, classes):
    """{row: {cls_oa, c2st, feature_fid}} of the evaluations, with the real-against-real figures
    and chance beside them (None: not measured)."""

    def row(report):
        m = report["metrics"]
        return {k: m[k]["value"] if k in m else None for k in ("cls_oa", "c2st", "feature_fid")}

    ours, vae, real = reports
    m = ours["metrics"]
    rows = {"generated from the test captions (ours)": row(ours)}
    if real is not None:
        rows["real training images, as many (ceiling)"] = row(real)
    rows["VAE reconstructions of the test images"] = {**row(vae), "cls_oa": None}
    if "reference" in m.get("c2st", {}):
        rows[f"real {m['c2st']['reference']['split']} images against test (floor)"] = {
            "cls_oa": None,
            "c2st": m["c2st"]["reference"]["value"],
            "feature_fid": m.get("feature_fid", {}).get("reference", {}).get("value"),
        }
    if classes:
        rows[f"chance ({len(classes)} classes)"] = {
            "cls_oa": 1 / len(classes),
            "c2st": 0.5,
            "feature_fid": None,
        }
    return rows


def real_overview(args, out, size, test, stages, figures, t0, cores, counts):
    """out/overview.png: per class, REAL_COLUMNS real test images beside the sample generated from
    each one's caption, then the figures."""
    real = FilesAsTrained([im.path for im in test], size)
    by_class = {}
    for i, im in enumerate(test):
        by_class.setdefault(im.label or "test images", []).append(i)
    rows = []
    for label, idx in sorted(by_class.items()):
        cells = []
        for i in idx[:REAL_COLUMNS]:
            sample = Image.open(out / "eval" / "generated" / f"{test[i].key}_0.png").convert("RGB")
            cells.append((tensor_to_pil(real[i]), sample, test[i].caption))
        rows.append((label, cells))
    trained = ", ".join(f"{k} {v['steps']} steps" for k, v in stages.items() if v.get("steps"))
    header = [
        f"text2earth on {args.data}, {size} px, CPU only ({cores} cores)",
        f"VAE, U-Net and text tower trained here from scratch on its train split ({counts[1]} "
        f"images, {counts[0]} captions)",
        f"stages: {trained}; whole run {(time.time() - t0) / 60:.1f} min; sampling: "
        f"DPM-Solver++(2M) {args.steps} steps, guidance {args.cfg:g}",
        "each pair: a real test image and the sample generated from its caption (beside it)",
    ]
    columns = [f"test image {k + 1}" for k in range(REAL_COLUMNS)]
    overview_page(
        out / "overview.png",
        header,
        columns,
        rows,
        figures,
        cell=96,
        figures=REAL_FIGURES,
        title="evaluate.py (one run each)",
        labels=("real", "generated"),
    )


def real_main(args, out, t0, budget, cores):
    """The recipe for real imagery: the train split into image shards, the VAE, latents, the U-Net
    and text tower (all from scratch), then evaluate.py on the test split for the samples, the VAE's
    reconstructions and as many real training images; the overview and results.json."""
    stages = {}
    unet_cfg = load_config(args.unet_config)
    size = args.image_size or unet_cfg.image_size
    out.mkdir(parents=True, exist_ok=True)
    test = karpathy(args.data, "test")
    print(f"writing the train split of {args.data} at {size} px ...", flush=True)
    t = time.time()
    counts = real_pool(args.data, out / "images", size, args.seed)
    stages["images"] = {"samples": counts[0], "images": counts[1], "seconds": time.time() - t}
    reserve = None
    if budget is not None:
        reserve = real_eval_seconds(args, unet_cfg.model, size, len(test)) + SAMPLING_MARGIN
    stages["vae"] = vae_stage(args, out, t0, budget)
    vae_file = out / "vae" / "model.safetensors"
    latents_and_unet(args, out, vae_file, (t0, budget, reserve), None, stages)
    t = time.time()
    level = [] if test[0].level is not None else ["--level", "0"]  # no gsd_m: trained without one
    ours = run_evaluation(
        args,
        out,
        size,
        "eval",
        args.eval_n,
        "--weights",
        str(out / "model.safetensors"),
        "--steps",
        str(args.steps),
        "--cfg",
        str(args.cfg),
        "--batch",
        "64",
        *level,
    )
    reconstructions(vae_file, test, size, out / "eval_vae" / "generated")
    vae = run_evaluation(args, out, size, "eval_vae", 1)
    real = None
    if equal_count_real(args.data, test, args.eval_n, size, out / "eval_real" / "generated"):
        real = run_evaluation(args, out, size, "eval_real", args.eval_n)
    stages["evaluation"] = {"seconds": time.time() - t, "reserved_seconds": reserve}
    figures = real_figures((ours, vae, real), ours["classes"])
    real_overview(args, out, size, test, stages, figures, t0, cores, counts)
    summary = {
        "figures": figures,
        "total_minutes": (time.time() - t0) / 60,
        "stages": stages,
        "cpu": cpu_name(),
        "cores": cores,
        **vars(args),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    for name, row in figures.items():
        cells = [
            fmt.format(row[key]) if row[key] is not None else "-" for _, key, fmt in REAL_FIGURES
        ]
        print(f"{name:48s} " + "  ".join(cells))
    print(
        f"done in {summary['total_minutes']:.1f} min: {out / 'overview.png'}, the reports in "
        f"{out}/eval*/report.md, weights {out / 'model.safetensors'}"
    )
    print(
        f"try: python sample.py --weights {out / 'model.safetensors'} --size {size} {size} "
        f'--cfg {args.cfg:g} {" ".join(level)} --prompt "{test[0].caption}"'
    )
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage(__doc__, DemoConfig()))
        raise SystemExit(0)
    try:
        args = parse_args(argv)
    except (ValueError, WeightsError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    if args.train_vae or args.train_probe:
        out.mkdir(parents=True, exist_ok=True)
        return make_pretrained(args, out, " ".join(["python demo.py", *argv]))
    if (out / "overview.png").exists() and not args.overwrite:
        print(
            f"demo.py: error: {out} holds a finished demo; pass --overwrite to redo it or "
            "--out=DIR for another folder",
            file=sys.stderr,
        )
        raise SystemExit(2)
    # redo, not just re-sample
    redo = ("eval", "eval_vae", "eval_real", "realism_net.safetensors")
    for trained in ("unet", "vae", "probe.safetensors", *redo) if args.overwrite else ():
        path = out / trained
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    budget = None if args.fast or args.unet_steps else args.minutes * 60  # None: fixed steps
    stages, cores = {}, usable_cores()
    if args.data:
        return real_main(args, out, t0, budget, cores)
    model, size, probe_file, job, reserve = train_models(args, out, t0, budget, cores, stages)
    probe, results = scoring_probe(probe_file, job, stages)
    targets, images, globe = sample_and_measure(args, model, probe, size, results, reserve, stages)
    return write_outputs(
        args, out, model, size, targets, images, results, globe, stages, t0, budget, cores
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
