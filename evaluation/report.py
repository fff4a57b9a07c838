"""One-page report of a conditioning evaluation: a row per class, a column per level, in each cell
the real render a prompt was written from beside the image generated from that prompt, enlarged for
viewing, the prompt beneath; then the probe's table (evaluation/probe.py) with
its ceiling and floor rows.

    overview_page("overview.png", ["title", "a line of facts"], ["L11 (64 m)", ...],
                  [(row label, [(real, generated, prompt), ...]), ...],
                  {"row name": {"class_acc": ..., ...}})
"""

import textwrap

from PIL import Image, ImageDraw, ImageFont

FIGURES = (
    ("class", "class_acc", "{:5.1%}"),
    ("level exact", "level_acc", "{:5.1%}"),
    ("level +-1", "level_acc_pm1", "{:5.1%}"),
    ("level corr.", "level_corr", "{:5.2f}"),
)


def load_font(size):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def overview_page(
    path,
    header,
    columns,
    rows,
    table,
    cell=128,
    footer=None,
    figures=FIGURES,
    title="probe (evaluation/probe.py)",
    labels=("real render", "generated"),
):
    """Write the page to `path`. header: lines of text at the top; columns: one label per level;
    rows: (label, [(real PIL image, generated PIL image, prompt) per column]); table: {row name:
    {key: figure or None}} with the keys of `figures` ((heading, key, format) per column; the
    default: evaluate_probe's), under `title`. Images are enlarged to `cell` pixels with
    nearest-neighbour sampling (every pixel the model made stays visible); `labels` name the two
    images of a pair. footer: a PIL image added beneath the table (the demo's editing examples,
    evaluation/showcase.py)."""
    font, small, tiny = load_font(15), load_font(12), load_font(10)
    label_w, gap, pad, text_h = 150, 14, 10, 52
    pair_w = 2 * cell + 4 + gap
    row_h = cell + text_h + 8
    top = pad + 22 * len(header) + 44
    table_h = 30 + 22 * (len(table) + 1)
    width = (
        max(
            label_w + pair_w * len(columns), 380 + 130 * len(figures), footer.width if footer else 0
        )
        + pad
    )
    page = Image.new(
        "RGB",
        (width, top + len(rows) * row_h + table_h + (footer.height if footer else 0)),
        "white",
    )
    d = ImageDraw.Draw(page)
    for k, line in enumerate(header):
        d.text((pad, pad + 22 * k), line, fill="black", font=font)
    for j, name in enumerate(columns):
        x = label_w + j * pair_w
        d.text((x, top - 40), name, fill="black", font=font)
        d.text((x, top - 18), labels[0], fill="gray", font=small)
        d.text((x + cell + 4, top - 18), labels[1], fill="gray", font=small)
    for i, (label, cells) in enumerate(rows):
        y = top + i * row_h
        for k, line in enumerate(textwrap.wrap(label, 20)[:4]):
            d.text((pad, y + 4 + 15 * k), line, fill="black", font=small)
        for j, (real, generated, prompt) in enumerate(cells):
            x = label_w + j * pair_w
            page.paste(real.resize((cell, cell), Image.NEAREST), (x, y))
            page.paste(generated.resize((cell, cell), Image.NEAREST), (x + cell + 4, y))
            for k, line in enumerate(textwrap.wrap(prompt, 2 * cell // 6)[:4]):
                d.text((x, y + cell + 2 + 12 * k), line, fill="dimgray", font=tiny)
    y = top + len(rows) * row_h + 14
    cols_x = [(380 if figures is not FIGURES else 300) + 130 * k for k in range(len(figures))]
    d.text((pad, y), title, fill="black", font=font)
    for x, (head, _, _) in zip(cols_x, figures):
        d.text((x, y), head, fill="black", font=font)
    for k, (name, values) in enumerate(table.items()):
        row_y = y + 22 * (k + 1)
        d.text((pad, row_y), name, fill="black", font=small)
        for x, (_, key, fmt) in zip(cols_x, figures):
            shown = "-" if values.get(key) is None else fmt.format(values[key])
            d.text((x, row_y), shown, fill="black", font=small)
    if footer is not None:
        page.paste(footer, (0, top + len(rows) * row_h + table_h))
    page.save(path)


def results_table(results):
    """The probe's figures {row name: evaluate_probe figures} as a text table
    (what demo.py prints)."""
    lines = [f"\n{'':36s} class   level  level+-1  level corr."]
    for name, r in results.items():
        lines.append(
            f"{name:36s} "
            + "  ".join(f"{100 * r[k]:5.1f}%" for k in ("class_acc", "level_acc", "level_acc_pm1"))
            + f"  {r['level_corr']:5.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# evaluate.py's Markdown report
# ----------------------------------------------------------------------------------------------

# (column, metric key, field, format): the paper's three columns first, then the rest
PAPER_COLUMNS = (
    ("FID (lower)", "fid", "value", "{:.2f}"),
    ("zero-shot Cls-OA", "cls_oa", "value", "{:.2%}"),
    ("CLIP score", "clip_score", "value", "{:.2f}"),
)
MORE_COLUMNS = (
    ("KID x1000", "kid", "value", "{:.2f}", 1000),
    ("CMMD", "cmmd", "value", "{:.3f}", 1),
    ("precision", "precision", "value", "{:.3f}", 1),
    ("recall", "recall", "value", "{:.3f}", 1),
    ("Cls-AA", "cls_oa", "aa", "{:.2%}", 1),
    ("level exact", "level", "value", "{:.1%}", 1),
    ("level +-1", "level", "within_one", "{:.1%}", 1),
    ("level corr.", "level", "corr", "{:.2f}", 1),
    ("probe class", "probe_class", "value", "{:.1%}", 1),
    ("IS", "is", "value", "{:.2f}", 1),
    ("C2ST acc.", "c2st", "value", "{:.1%}", 1),
    ("feature FID", "feature_fid", "value", "{:.2f}", 1),
)
PROTOCOL_NAMES = {
    "ours": "ours (pytorch-fid's FID; not comparable with the papers' RSICD table)",
    "mhn": "Txt2Img-MHN's (the papers' RSICD table), evaluation/mhn.py",
}


def _cell(metrics, key, field, fmt, scale=1):
    v = metrics.get(key, {}).get(field)
    return "-" if v is None else fmt.format(v * scale)


def evaluation_table(report):
    """Markdown: the paper's table (FID, zero-shot Cls-OA, CLIP score) for this model, the other
    figures, and the settings that define every number (implementation, resize, N, sampler,
    steps, guidance, seed)."""
    m, g = report["metrics"], report.get("generation", {})
    name = report.get("weights") or "generated images"
    protocol = report.get("protocol", "ours")
    lines = [
        f"# Evaluation of {name} on {report['test']} ({report['split']})",
        "",
        f"Protocol: {PROTOCOL_NAMES.get(protocol, protocol)}",
        "",
        "| method | " + " | ".join(c[0] for c in PAPER_COLUMNS) + " |",
        "|---" * (len(PAPER_COLUMNS) + 1) + "|",
        f"| {name} | " + " | ".join(_cell(m, *c[1:]) for c in PAPER_COLUMNS) + " |",
        "",
        "| " + " | ".join(c[0] for c in MORE_COLUMNS) + " |",
        "|---" * len(MORE_COLUMNS) + "|",
        "| " + " | ".join(_cell(m, *c[1:]) for c in MORE_COLUMNS) + " |",
        "",
        "Settings:",
        f"- test set: {report['test']}, split {report['split']}, {report['n_test']} images, "
        f"{len(report['classes'] or [])} classes; {report['n_generated']} generated "
        f"({g.get('n', '?')} per test image, from its first caption)",
        f"- generation: {g.get('size', ['?'])[0]} px, sampler {g.get('sampler')}, {g.get('steps')} "
        f"steps, guidance {g.get('cfg')} (level {g.get('level_cfg')}), negative prompt "
        f"{g.get('negative_prompt')!r}, seed {g.get('seed')} + n * i + k",
    ]
    for key, r in m.items():
        extra = "".join(
            f", {k} {r[k]}"
            for k in ("n_real", "n_fake", "subset_size", "k", "n_train", "n_test", "n")
            if k in r
        )
        lines.append(f"- {key}: {r.get('implementation', '')}{extra}")
        if key == "clip_score" and r.get("real_images") is not None:
            lines.append(
                f"- clip_score of the real test images with their captions: {r['real_images']:.2f}"
            )
        if r.get("reference") is not None:
            ref = r["reference"]
            lines.append(
                f"- {key} of the real {ref['split']} images against the real test images (the "
                f"scale's floor): {ref['value']:.3f}"
            )
        if key == "is" and r.get("real_images") is not None:
            lines.append(f"- IS of the real FID images: {r['real_images']:.2f}")
        lines += [f"- {key}: note: {n}" for n in r.get("notes", [])]
    lines += [f"- not measured: {k} ({why})" for k, why in report.get("skipped", {}).items()]
    lines += [f"- deviation from their protocol: {d}" for d in report.get("deviations", [])]
    return "\n".join(lines) + "\n"
