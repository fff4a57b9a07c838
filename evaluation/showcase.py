"""The editing capabilities on one page strip (demo.py's overview): inpainting, cloud removal and a
canvas, made by a model of the procedural Earth from held-out scenes, each
beside what it started from.

    strip = editing_strip(model, size=32, guidance=conditions.scales(model.cfg, 3.0, level=6.0),
                          steps=20)
"""

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.synthetic import CLASSES, make_scene, modalities, sample
from data.transforms import tensor_to_pil
from model import conditions, editing
from evaluation.report import load_font

# what the inpainting and cloud examples start from
SHOW_CLASSES = ("river", "desert", "dense_residential")
FILL_CLASS = "forest"  # what the inpainted hole is asked to become


def _tensor(u8):
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1)[None].float() / 127.5 - 1


def editing_examples(model, size, guidance, steps, level=14.0, seed=20_000):
    """{row title: [(caption, PIL image), ...]}: three inpaintings (the centre asked to be forest),
    three cloud removals (estimated masks) with the truth, and a canvas of 8 tiles (outpainting)."""
    kw = dict(steps=steps, guidance=guidance)
    rows = {}
    starts = [
        sample(seed + i, level, size, cls=CLASSES.index(c)) for i, c in enumerate(SHOW_CLASSES)
    ]
    image = torch.cat([_tensor(s["image"]) for s in starts])
    mask = torch.zeros(len(starts), 1, size, size)
    mask[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    fill = sample(seed + 99, level, size, cls=CLASSES.index(FILL_CLASS))["caption"]
    asked = conditions.request(model.cfg, len(starts), text=fill, level=level)
    done = editing.inpaint(model, asked, image, mask, seeds=list(range(len(starts))), **kw)
    rows[f"inpainting: the centre asked to be {FILL_CLASS}"] = [
        item
        for k in range(len(starts))
        for item in (
            ("input", tensor_to_pil(image[k])),
            ("masked", tensor_to_pil(image[k] * (mask[k] < 0.5))),
            ("inpainted", tensor_to_pil(done[k])),
        )
    ]
    views = [
        modalities(make_scene(seed + 10 + i, CLASSES.index(c)), level, size, seed=i)
        for i, c in enumerate(SHOW_CLASSES)
    ]
    cloudy = torch.cat([_tensor(v["cloud"]) for v in views])
    clouds = editing.cloud_mask(cloudy)
    captions = [
        sample(seed + 10 + i, level, size, cls=CLASSES.index(c))["caption"]
        for i, c in enumerate(SHOW_CLASSES)
    ]
    asked = conditions.request(model.cfg, len(views), text=captions, level=level)
    clear = editing.inpaint(model, asked, cloudy, clouds, seeds=list(range(len(views))), **kw)
    rows["cloud removal: the mask estimated, the clouds inpainted"] = [
        item
        for k, v in enumerate(views)
        for item in (
            ("cloudy", tensor_to_pil(cloudy[k])),
            ("cloud-free", tensor_to_pil(clear[k])),
            ("truth", Image.fromarray(v["rgb"])),
        )
    ]
    tile, overlap = size, size // 2
    width = tile + 7 * (tile - overlap)
    canvas = editing.extend(
        model,
        [sample(seed + 50, level, size, cls=CLASSES.index("farmland"))["caption"]],
        (size, width),
        values={"level": level},
        tile=tile,
        overlap=overlap,
        **kw,
    )
    rows[f"canvas: 8 tiles of {tile} px outpainted one after another ({size}x{width})"] = [
        ("", tensor_to_pil(canvas[0]))
    ]
    return rows


def editing_strip(model, size, guidance, steps, cell=96, **kw):
    """The examples drawn as rows of captioned images (draw_strip)."""
    return draw_strip(editing_examples(model, size, guidance, steps, **kw), size, cell)


def draw_strip(rows, size, cell=96, heading=None):
    """{row title: [(caption, PIL image)]} drawn as rows of captioned images, each enlarged
    `cell / size` times (nearest neighbour), under a `heading` line if given."""
    font, small = load_font(15), load_font(11)
    scale, pad, gap = cell / size, 10, 6
    widths = [sum(round(im.width * scale) + gap for _, im in row) for row in rows.values()]
    widths += [round(font.getlength(text)) for text in [*rows, heading or ""]]
    row_h, top = cell + 40, pad + (24 if heading else 0)
    page = Image.new("RGB", (max(widths) + 2 * pad, top + len(rows) * row_h), "white")
    d = ImageDraw.Draw(page)
    if heading:
        d.text((pad, pad), heading, fill="black", font=font)
    for r, (title, row) in enumerate(rows.items()):
        y, x = top + r * row_h, pad
        d.text((x, y), title, fill="black", font=font)
        for caption, im in row:
            big = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
            page.paste(big, (x, y + 20))
            d.text((x, y + 22 + cell), caption, fill="dimgray", font=small)
            x += big.width + gap
    return page


def stack_images(images, gap=8):
    """PIL images one beneath the other, left-aligned on white."""
    page = Image.new(
        "RGB",
        (max(im.width for im in images), sum(im.height + gap for im in images)),
        "white",
    )
    y = 0
    for im in images:
        page.paste(im, (0, y))
        y += im.height + gap
    return page
