"""The embedded default, end to end on a CPU with no downloads: procedural Earth -> trained model -> images.

    python demo.py                     # about 10 minutes on 2 CPU cores
    python demo.py --fast              # the shortened version CI runs

1. renders training scenes of the procedural Earth (data/synthetic.py) once, into shards (data/shards.py);
   trains a tiny KL-VAE on them, encodes them into latent shards, and trains a tiny U-Net with a small text
   tower on those, for as many steps as the run's time budget leaves (configs/demo.py `minutes`; --unet-steps N
   for a fixed number); each with train.py's own loop (resumable: rerun the command after an interruption);
2. trains the conditioning probe (model/probe.py), a small classifier of scene class and map level, in a process
   of its own on one core beside the U-Net (on two cores the U-Net gains little from its second thread);
3. samples prompts x levels (x seeds) and measures, with the probe, how often a generated image shows the class
   its prompt asked for (text adherence) and the level asked for (resolution control), next to the same figures
   for real procedural images (the ceiling) and for unconditional samples (the floor);
4. writes out/demo/: model.safetensors (works with `sample.py --weights`), grid.png, overview.png,
   results.json, probe.pt (the probe's state dict and its ceilings).
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import train
from data.shards import ShardDataset, write_shards
from data.synthetic import CLASSES, InOrder, ProceduralEarth, sample as procedural_sample
from model.config import load_config
from model.probe import Probe, evaluate_probe, make_probe_data, train_probe
from model.weights import load_model
from sample import generate, to_pil

GRID_LEVELS = (11, 13, 15, 17)


def stage_config(cfg_file, stage, out_dir, steps=None, init_from=""):
    cfg = train.TrainConfig(model=cfg_file.model, out_dir=str(out_dir), init_from=init_from)
    for k, v in {**cfg_file.common, **stage}.items():
        if not hasattr(cfg, k):
            raise ValueError(f"configs/demo.py: unknown TrainConfig key {k!r}")
        setattr(cfg, k, v)
    if steps is not None:
        cfg.max_steps = steps
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


def stopped(cfg):
    """Leave (resumably) when a training stage was stopped by a signal rather than finished."""
    if not train.finished(cfg):
        raise SystemExit(f"demo.py: training stopped in {cfg.out_dir}; run the same command again to resume")


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


def render_pool(out_dir, n, cfg, processes=1):
    """The demo's training scenes: the first n procedural samples of the stage's data (TrainConfig cfg), rendered
    once into lossless image shards in out_dir. The VAE trains on them, several epochs (rendering every batch anew
    would cost half as much again as the VAE step itself on two cores), and the U-Net on their latents.
    An out_dir already holding the same scenes is kept (resume); other contents are replaced. `processes`
    render at once (the same scenes)."""
    spec = dict(n=n, size=cfg.image_size, levels=list(cfg.synthetic_levels), seed=cfg.seed,  # ProceduralEarth's
                integer_levels=cfg.synthetic_integer_levels)
    if not _complete(out_dir, spec):
        _mark(out_dir, None)
        write_shards(InOrder(ProceduralEarth(**spec), processes), out_dir, samples_per_shard=max(1, n // 8),
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


def generate_all(model, prompts, levels, cfg_scale, steps, size, level_cfg=None, batch=54):
    images = []
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        images.append(generate(model, prompts[i:j], levels[i:j], seeds=list(range(i, j)), steps=steps, cfg=cfg_scale,
                               size=(size, size), level_cfg=level_cfg))
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
        d.text((label_w + j * cell + 20, top - 14), f"L{level} ({2 ** (17 - level):g} m)", fill="black", font=font)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--fast", action="store_true", help="the shortened run CI uses (a fraction of the steps)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the text (with the level, see below)")
    p.add_argument("--level-cfg", type=float, default=6.0,
                   help="guidance scale of the level on its own (model/guidance.py); equal to --cfg: joint guidance")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps per sample")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the whole run (default: the config's `minutes`): the U-Net trains for what the "
                        "render, the VAE and the encoding leave of it, as many steps as fit on this machine")
    p.add_argument("--unet-steps", type=int, default=None,
                   help="train the U-Net exactly this many steps instead (a run that repeats on any machine)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished demo in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "overview.png").exists() and not args.overwrite:
        p.error(f"{out} holds a finished demo; pass --overwrite to redo it or --out for another folder")
    cfg_file = load_config(args.config)
    torch.manual_seed(0)
    t0 = time.time()
    fast = cfg_file.fast if args.fast else {}

    # 1. The model: training scenes, VAE, their latents, then U-Net + text tower; each step resumable. The probe
    #    (step 2) is made beside the U-Net, in its own process.
    n_pool = fast.get("pool", cfg_file.pool)
    vae_cfg = stage_config(cfg_file, cfg_file.vae_stage, out / "vae", fast.get("vae_steps"))
    vae_cfg.data, vae_cfg.data_path = "shards", str(out / "images")
    unet_steps = args.unet_steps or fast.get("unet_steps")          # fixed steps: the time budget is off
    unet_cfg = stage_config(cfg_file, cfg_file.unet_stage, out / "unet", unet_steps,
                            init_from=str(out / "vae" / "model.safetensors"))
    unet_cfg.data, unet_cfg.data_path = "shards", str(out / "latents")
    size = unet_cfg.image_size
    out.mkdir(parents=True, exist_ok=True)
    fork = multiprocessing.get_context("fork")          # starts at once; the child runs torch on one thread only
    vae_ready = fork.Event()
    probe_file = out / "probe.pt"
    job = fork.Process(target=probe_job, daemon=True, args=(
        size, fast.get("probe_train_images", cfg_file.probe_train_images),
        fast.get("probe_steps", cfg_file.probe_steps), unet_cfg.init_from, vae_ready, probe_file))
    job.start()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"rendering {n_pool} training scenes ...", flush=True)
    render_pool(out / "images", n_pool, vae_cfg, processes=min(cores, 8))
    train.train(vae_cfg)
    stopped(vae_cfg)
    vae_ready.set()
    print("encoding them with the trained VAE; the conditioning probe trains beside the U-Net ...", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))          # one core for the probe while it trains

    handed_back = {"unet_step": None}                      # when the probe finished (results.json)

    def give_back_the_core(step):
        if handed_back["unet_step"] is None and not job.is_alive():
            torch.set_num_threads(threads)
            handed_back["unet_step"] = step

    encode_pool(unet_cfg.init_from, out / "images", out / "latents")
    if unet_steps is None:
        budget = cfg_file.minutes if args.minutes is None else args.minutes
        unet_cfg.max_minutes = unet_budget(out / "unet", budget * 60 - (time.time() - t0))
    train.train(unet_cfg, on_step=give_back_the_core)
    torch.set_num_threads(threads)
    stopped(unet_cfg)
    shutil.copyfile(out / "unet" / "model.safetensors", out / "model.safetensors")
    unet_trained = train.checkpoint_step(train.checkpoint_paths(out / "unet")[-1])
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
    targets = eval_targets(size) * fast.get("eval_seeds", cfg_file.eval_seeds)
    prompts, levels, labels = [t[0] for t in targets], [t[1] for t in targets], torch.tensor([t[2] for t in targets])
    lv = torch.tensor(levels)
    images = generate_all(model, prompts, levels, args.cfg, args.steps, size, args.level_cfg)
    results["generated, prompt + level (ours)"] = evaluate_probe(probe, images, labels, lv)
    uncond = generate_all(model, [""] * len(prompts), [0.0] * len(prompts), 1.0, args.steps, size)
    results["unconditional samples (floor)"] = evaluate_probe(probe, uncond, labels, lv)

    # 4. Outputs.
    per_class = len(range(10, 19))
    grid_rows = []
    for c in range(0, len(CLASSES), 2):
        row = [to_pil(images[c * per_class + (level - 10)]) for level in GRID_LEVELS]
        grid_rows.append((f"[{CLASSES[c]}] " + prompts[c * per_class + (GRID_LEVELS[0] - 10)], row))
    grid = Image.new("RGB", (size * len(GRID_LEVELS), size * len(grid_rows)))
    for i, (_, row) in enumerate(grid_rows):
        for j, im in enumerate(row):
            grid.paste(im, (size * j, size * i))
    grid.save(out / "grid.png")
    elapsed = time.time() - t0
    overview(out / "overview.png", grid_rows, results, t_train,
             f"U-Net {unet_trained} steps; guidance: text {args.cfg:g}, level {args.level_cfg:g}")
    summary = {"results": results, "train_minutes": t_train / 60, "total_minutes": elapsed / 60,
               "unet_steps": unet_trained, "unet_minutes_budget": unet_cfg.max_minutes or None,
               "probe_minutes": saved["minutes"], "probe_done_at_unet_step": handed_back["unet_step"],
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
