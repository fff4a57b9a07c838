"""The embedded default, end to end on a CPU with no downloads: procedural Earth -> trained model -> images.

    python demo.py                     # about 10 minutes on 2 CPU cores
    python demo.py --fast              # the shortened version CI runs

1. renders training scenes of the procedural Earth (data/synthetic/) once, into shards (data/shards.py); trains
   a tiny KL-VAE on them (`train.py --config configs/demo_vae.py`), encodes them into latent shards, and trains a
   tiny U-Net with a small text tower on those (`configs/demo_unet.py`) for as many steps as the run's time budget
   leaves (`--minutes`; `--unet_steps=N` for a fixed number). Each stage is resumable: rerun the command after an
   interruption;
2. trains the conditioning probe (evaluation/probe.py), a small classifier of scene class and map level, in a
   process of its own on one core beside the U-Net;
3. samples prompts x levels (x seeds) and measures, with the probe, how often a generated image shows the class
   its prompt asked for (text adherence) and the level asked for (resolution control), next to the same figures
   for real procedural images (the ceiling) and for unconditional samples (the floor);
4. writes OUT/: model.safetensors (works with `sample.py --weights`), grid.png, overview.png, results.json,
   probe.pt (the probe's state dict and its ceilings).

Options are `--key=value` for the fields of DemoConfig below (a bare `--flag` sets a boolean), type-checked.
"""
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from data.levels import resolution_from_level
from data.shards import ShardDataset, write_shards
from data.synthetic import CLASSES, InOrder, ProceduralEarth, sample as procedural_sample
from data.transforms import image_grid, tensor_to_pil
from evaluation.probe import Probe, evaluate_probe, make_probe_data, train_probe
from model.checkpoint import checkpoint_paths, checkpoint_step, finished
from model.config import configure, load_config, usage
from model.pipeline import generate
from model.weights import load_model

GRID_LEVELS = (11, 13, 15, 17)
FAST = dict(vae_steps=600, unet_steps=600, pool=4000, probe_train_images=2160, probe_steps=1000)


@dataclass
class DemoConfig:
    out: str = "out/demo"
    vae_config: str = "configs/demo_vae.py"
    unet_config: str = "configs/demo_unet.py"
    fast: bool = False                # the shortened run CI uses: the FAST steps and sizes, no time budget
    minutes: float = 9.5              # time budget of the whole run: the U-Net trains for what the rest leaves
    unet_steps: int = 0               # > 0: train the U-Net exactly this many steps (a run that repeats anywhere)
    vae_steps: int = 0                # > 0: instead of the VAE stage's max_steps
    pool: int = 8000                  # training scenes, rendered once (image shards), VAE-encoded once (latents)
    eval_seeds: int = 3               # samples per (class, level) prompt: 324 in all, standard error ~2.2 points
    probe_train_images: int = 6480    # the conditioning probe: renders it trains on (half through the VAE) ...
    probe_steps: int = 4000           # ... and its optimisation steps (about 1.4 min on one core)
    cfg: float = 3.0                  # guidance scale of the text (and of the level, unless level_cfg differs)
    level_cfg: float = 6.0            # guidance scale of the level on its own (model/guidance.py)
    steps: int = 20                   # DPM-Solver++(2M) steps per sample
    overwrite: bool = False           # replace a finished demo in `out`


def parse_args(argv):
    """DemoConfig from --key=value overrides (and an optional --config FILE of plain values), FAST under --fast."""
    argv = list(argv)
    cfg = configure(DemoConfig(), argv)
    if cfg.fast:
        given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        for k, v in FAST.items():
            if k not in given:
                setattr(cfg, k, v)
    for key in ("pool", "eval_seeds", "probe_train_images", "probe_steps", "steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.minutes <= 0 or cfg.unet_steps < 0 or cfg.vae_steps < 0 or cfg.cfg < 0 or cfg.level_cfg < 0:
        raise ValueError("--minutes must be > 0, --unet_steps and --vae_steps >= 0, the guidance scales >= 0")
    for path in (cfg.vae_config, cfg.unet_config):
        if not Path(path).is_file():
            raise ValueError(f"stage config {path} does not exist")
    return cfg


def eval_targets(size, levels=(10, 18), seed=10_000):
    """One prompt per (class, integer level): the caption of a held-out procedural scene of that class, seen
    size x size pixels (the caption tells what that frame shows)."""
    targets = []
    for c in range(len(CLASSES)):
        for level in range(levels[0], levels[1] + 1):
            s = procedural_sample(seed + 100 * c + level, level=float(level), size=size, cls=c)
            targets.append((s["caption"], float(level), c))
    return targets


def scenes(stage_file, n):
    """The procedural scenes a stage config trains on: ProceduralEarth's arguments (its image size and levels)."""
    values = vars(load_config(stage_file))
    missing = [key for key in ("image_size", "synthetic_levels", "synthetic_integer_levels") if key not in values]
    if missing:
        raise ValueError(f"{stage_file}: the demo needs {missing} there (the scenes it trains on)")
    return dict(n=n, size=values["image_size"], levels=list(values["synthetic_levels"]), seed=values.get("seed", 0),
                integer_levels=values["synthetic_integer_levels"])


def usable_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_stage(stage_file, out_dir, max_steps, *overrides, beside=None):
    """One training stage: train.py in a process of its own, as a user would run it (max_steps: 0 = the stage
    config's). An interruption (Ctrl-C, SIGTERM) reaches it too: it saves a checkpoint and stops, and rerunning
    the demo resumes it. beside: a process (the probe) that has one core to itself; the stage runs on the others
    until it ends, then is stopped and resumed on all of them (a checkpoint and an exact resume: a second thread
    on the same core would cost both jobs far more than it gives)."""
    max_steps = max_steps or load_config(stage_file).max_steps
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--config", str(stage_file),
           f"--out_dir={out_dir}", f"--max_steps={max_steps}", *overrides]
    cores = usable_cores()
    shared = beside is not None and beside.is_alive() and cores > 1
    proc = subprocess.Popen(cmd + ([f"--threads={cores - 1}"] if shared else []))
    forward = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))  # to the stage
    while True:
        try:
            while shared and proc.poll() is None and beside.is_alive():
                beside.join(timeout=1.0)
            if shared and proc.poll() is None:                    # the core is free: hand it over
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                shared = False
                proc = subprocess.Popen(cmd)
            code = proc.wait()
            break
        except KeyboardInterrupt:                            # the stage got the signal too: let it save
            shared = False
            continue
    signal.signal(signal.SIGTERM, forward)
    if code != 0 or not finished(out_dir, max_steps):
        raise SystemExit(f"demo.py: the stage {stage_file} stopped (exit code {code}) in {out_dir}; run the same "
                         "command again to resume")


def _complete(out_dir, spec):
    """Whether out_dir holds finished shards made from `spec` (a dict saved beside them once they are written)."""
    made = Path(out_dir) / "made_from.json"
    return made.exists() and json.loads(made.read_text()) == spec


def _mark(out_dir, spec):
    """spec=None: the shards in out_dir are about to be replaced (an interrupted rewrite must not pass as done)."""
    made = Path(out_dir) / "made_from.json"
    if spec is None:
        made.unlink(missing_ok=True)
    else:
        made.write_text(json.dumps(spec))


def render_pool(out_dir, spec, processes=1):
    """The demo's training scenes: the first n procedural samples (ProceduralEarth(**spec)), rendered once into
    lossless image shards in out_dir. The VAE trains on them, several epochs (rendering every batch anew would
    cost half as much again as the VAE step itself on two cores), and the U-Net on their latents. An out_dir
    already holding the same scenes is kept (resume); other contents are replaced. `processes` render at once."""
    if not _complete(out_dir, spec):
        _mark(out_dir, None)
        write_shards(InOrder(ProceduralEarth(**spec), processes), out_dir, samples_per_shard=max(1, spec["n"] // 8),
                     image_format="png", overwrite=True, progress=True)
        _mark(out_dir, spec)


def encode_pool(vae_file, images_dir, out_dir):
    """The image shards of render_pool, encoded once by the trained VAE (posterior means, scaled) into latent
    shards in out_dir: the U-Net then reads latents only. Kept on resume only if made from the same images
    by the same VAE weights."""
    spec = dict(images=json.loads((Path(images_dir) / "made_from.json").read_text()),
                vae_sha256=hashlib.sha256(Path(vae_file).read_bytes()).hexdigest())
    if not _complete(out_dir, spec):
        _mark(out_dir, None)
        model = load_model(vae_file).eval()
        images = ShardDataset(images_dir, rank=0, world_size=1, shuffle_buffer=0, shuffle_shards=False)
        write_shards(images, out_dir, samples_per_shard=max(1, spec["images"]["n"] // 8), batch_size=64,
                     write_images=False, overwrite=True, encode_fn=lambda x: model.encode_images(x, sample=False),
                     progress=True)
        _mark(out_dir, spec)


@torch.no_grad()
def through_vae(model, images, batch=256):
    """Encode and decode images (N, 3, H, W) in [-1, 1] with the model's VAE (posterior means)."""
    out = [model.vae.decode(model.vae.encode(images[i:i + batch]).mean) for i in range(0, len(images), batch)]
    return torch.cat(out).clamp(-1, 1)


def probe_job(size, n_train, steps, vae_file, vae_ready, out_file, n_held=540):
    """The conditioning probe, trained in a process of its own on one core while the U-Net trains on the others
    (on two cores the U-Net step gains only ~1.2x from its second thread; the probe ~1.2x too). Waits for the
    finished VAE (vae_ready, a multiprocessing Event), renders its scenes, passes half of its training images and
    all held-out ones through the VAE, trains, and writes out_file: the probe's state dict and its accuracy on
    held-out real images and on the same images through the VAE (the ceilings). Trained on real procedural
    images, half of them through the demo's VAE: generated images come out of its decoder, so the probe must
    judge their content, not the decoder's softness."""
    torch.set_num_threads(1)
    vae_ready.wait()
    t0 = time.time()
    images, labels, levels = make_probe_data(n=n_train, size=size, seed=1)
    held = make_probe_data(n=n_held, size=size, seed=2)
    model = load_model(vae_file).eval()
    half = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:len(images) // 2]
    images[half] = through_vae(model, images[half])
    probe = train_probe((images, labels, levels), steps=steps, batch_size=64, seed=0)
    results = {"real procedural images (ceiling)": evaluate_probe(probe, *held),
               "real images through the VAE": evaluate_probe(probe, through_vae(model, held[0]), *held[1:])}
    tmp = Path(out_file).with_suffix(".tmp")
    torch.save({"probe": probe.state_dict(), "results": results, "minutes": (time.time() - t0) / 60}, tmp)
    os.replace(tmp, out_file)


SAMPLING_SECONDS = 45      # what the demo reserves of its budget after the U-Net: loading, sampling and scoring 648
                           # images (324 prompted, 324 unconditional), the outputs; the U-Net's final checkpoint
MIN_UNET_MINUTES = 1.0     # the U-Net trains at least this long, budget or not


def unet_budget(unet_dir, seconds_left):
    """Minutes of U-Net training: what is left of the demo's budget after the reserve for sampling, at least
    MIN_UNET_MINUTES; a resumed stage keeps the budget it started with (its config.json)."""
    started = Path(unet_dir) / "config.json"
    if started.exists():
        return json.loads(started.read_text())["max_minutes"]
    minutes = (seconds_left - SAMPLING_SECONDS) / 60
    if minutes < MIN_UNET_MINUTES:
        print(f"demo.py: the time budget is spent before the U-Net; it trains {MIN_UNET_MINUTES:g} min anyway")
    return max(minutes, MIN_UNET_MINUTES)


def generate_all(model, prompts, levels, guidance, steps, size, batch=54):
    images = []
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        images.append(generate(model, {"text": prompts[i:j], "level": levels[i:j]}, seeds=list(range(i, j)),
                               steps=steps, guidance=guidance, size=(size, size)))
    return torch.cat(images)


def overview(path, grid_rows, results, elapsed, guidance=""):
    """One page: title, the prompts x levels grid with labels, the probe figures."""
    font = ImageFont.load_default()
    cell, label_w, top = 96, 330, 60
    rows, cols = len(grid_rows), len(GRID_LEVELS)
    table_h = 170
    page = Image.new("RGB", (label_w + cols * cell + 20, top + rows * cell + table_h), "white")
    d = ImageDraw.Draw(page)
    d.text((10, 8), "text2earth demo: tiny model trained on the procedural Earth, CPU only", fill="black", font=font)
    d.text((10, 26), f"columns: Google map level (resolution_m = 2^(17-L)); trained in {elapsed / 60:.1f} min; "
           f"{guidance}", fill="black", font=font)
    for j, level in enumerate(GRID_LEVELS):
        d.text((label_w + j * cell + 20, top - 14), f"L{level} ({resolution_from_level(level):g} m)", fill="black",
               font=font)
    for i, (prompt, images) in enumerate(grid_rows):
        y = top + i * cell
        words, line, lines = prompt.split(), "", []
        for w in words:
            if len(line) + len(w) > 50:
                lines.append(line)
                line = ""
            line += w + " "
        lines.append(line)
        for k, text in enumerate(lines[:5]):
            d.text((10, y + 8 + 12 * k), text, fill="black", font=font)
        for j, im in enumerate(images):
            page.paste(im.resize((cell - 4, cell - 4), Image.NEAREST), (label_w + j * cell, y))
    y = top + rows * cell + 10
    cols_x = (250, 310, 370, 440)
    d.text((10, y), "probe", fill="black", font=font)
    for x, head in zip(cols_x, ("class", "level", "level +-1", "level corr.")):
        d.text((x, y), head, fill="black", font=font)
    for k, name in enumerate(results):
        r, row_y = results[name], y + 18 * (k + 1)
        d.text((10, row_y), name, fill="black", font=font)
        for x, key in zip(cols_x, ("class_acc", "level_acc", "level_acc_pm1")):
            d.text((x, row_y), f"{100 * r[key]:5.1f}%", fill="black", font=font)
        d.text((cols_x[3], row_y), f"{r['level_corr']:5.2f}", fill="black", font=font)
    page.save(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage(__doc__, DemoConfig()))
        raise SystemExit(0)
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    if (out / "overview.png").exists() and not args.overwrite:
        print(f"demo.py: error: {out} holds a finished demo; pass --overwrite to redo it or --out=DIR for another "
              "folder", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)
    t0 = time.time()

    # 1. The model: training scenes, VAE, their latents, then U-Net + text tower; each step resumable. The probe
    #    (step 2) is made beside the U-Net, in its own process.
    spec = scenes(args.vae_config, args.pool)
    size = scenes(args.unet_config, args.pool)["size"]
    vae_file = out / "vae" / "model.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    fork = multiprocessing.get_context("fork")          # starts at once; the child runs torch on one thread only
    vae_ready = fork.Event()
    probe_file = out / "probe.pt"
    job = fork.Process(target=probe_job, daemon=True, args=(
        size, args.probe_train_images, args.probe_steps, vae_file, vae_ready, probe_file))
    job.start()
    cores = usable_cores()
    print(f"rendering {args.pool} training scenes ...", flush=True)
    render_pool(out / "images", spec, processes=min(cores, 8))
    run_stage(args.vae_config, out / "vae", args.vae_steps, "--data=shards", f"--data_path={out / 'images'}")
    vae_ready.set()
    print("encoding them with the trained VAE; the conditioning probe trains beside the U-Net ...", flush=True)
    encode_pool(vae_file, out / "images", out / "latents")
    unet_args = ["--data=shards", f"--data_path={out / 'latents'}", f"--init_from={vae_file}"]
    budget = None
    if not args.unet_steps:                             # fixed steps: the time budget is off
        budget = unet_budget(out / "unet", args.minutes * 60 - (time.time() - t0))
        unet_args.append(f"--max_minutes={budget}")
    run_stage(args.unet_config, out / "unet", args.unet_steps, *unet_args, beside=job)
    shutil.copyfile(out / "unet" / "model.safetensors", out / "model.safetensors")
    unet_trained = checkpoint_step(checkpoint_paths(out / "unet")[-1])
    model = load_model(out / "model.safetensors").eval()
    t_train = time.time() - t0

    # 2. The probe: its ceilings, on held-out real images and on the same images through the VAE.
    job.join()
    if job.exitcode != 0:
        raise SystemExit(f"demo.py: the probe's process failed (exit code {job.exitcode}; traceback above)")
    saved = torch.load(probe_file, weights_only=True)
    probe = Probe()
    probe.load_state_dict(saved["probe"])
    probe.eval()
    results = dict(saved["results"])

    # 3. Generated images: `eval_seeds` per (class, level) (each its own seed), the prompt a held-out caption of
    #    that class. The first 108 make the grid.
    print("sampling and measuring ...", flush=True)
    targets = eval_targets(size) * args.eval_seeds
    prompts, levels, labels = [t[0] for t in targets], [t[1] for t in targets], torch.tensor([t[2] for t in targets])
    lv = torch.tensor(levels)
    images = generate_all(model, prompts, levels, {"text": args.cfg, "level": args.level_cfg}, args.steps, size)
    results["generated, prompt + level (ours)"] = evaluate_probe(probe, images, labels, lv)
    uncond = generate_all(model, [""] * len(prompts), [0.0] * len(prompts), {"text": 1.0, "level": 1.0}, args.steps,
                          size)
    results["unconditional samples (floor)"] = evaluate_probe(probe, uncond, labels, lv)

    # 4. Outputs.
    per_class = len(range(10, 19))
    grid_rows = []
    for c in range(0, len(CLASSES), 2):
        row = [tensor_to_pil(images[c * per_class + (level - 10)]) for level in GRID_LEVELS]
        grid_rows.append((f"[{CLASSES[c]}] " + prompts[c * per_class + (GRID_LEVELS[0] - 10)], row))
    image_grid([im for _, row in grid_rows for im in row], cols=len(GRID_LEVELS)).save(out / "grid.png")
    elapsed = time.time() - t0
    overview(out / "overview.png", grid_rows, results, t_train,
             f"U-Net {unet_trained} steps; guidance: text {args.cfg:g}, level {args.level_cfg:g}")
    summary = {"results": results, "train_minutes": t_train / 60, "total_minutes": elapsed / 60,
               "unet_steps": unet_trained, "unet_minutes_budget": budget, "probe_minutes": saved["minutes"],
               "fast": args.fast, "cfg": args.cfg, "level_cfg": args.level_cfg, "steps": args.steps}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'':36s} class   level  level+-1  level corr.")
    for name, r in results.items():
        print(f"{name:36s} " + "  ".join(f"{100 * r[k]:5.1f}%" for k in ("class_acc", "level_acc", "level_acc_pm1"))
              + f"  {r['level_corr']:5.2f}")
    print(f"done in {elapsed / 60:.1f} min (U-Net {unet_trained} steps): {out / 'overview.png'}, {out / 'grid.png'}, "
          f"weights {out / 'model.safetensors'}")
    print(f"try: python sample.py --weights {out / 'model.safetensors'} --size {size} {size} --level 16 "
          f"--cfg {args.cfg:g} --level-cfg {args.level_cfg:g} --prompt \"{prompts[3 * per_class + 6]}\"")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
