"""One-page report of a conditioning evaluation: for each prompt, at each level, the real render the prompt was
written from beside the generated image, enlarged for viewing; then the probe's table (evaluation/probe.py) with
its ceiling and floor rows.

    overview_page("overview.png", ["title", "a line of facts"], ["L11 (64 m)", ...],
                  [(prompt, [(real, generated), ...]), ...], {"row name": {"class_acc": ..., ...}})
"""
from PIL import Image, ImageDraw, ImageFont

FIGURES = (("class", "class_acc", "{:5.1%}"), ("level exact", "level_acc", "{:5.1%}"),
           ("level +-1", "level_acc_pm1", "{:5.1%}"), ("level corr.", "level_corr", "{:5.2f}"))


def _font(size):
    try:
        return ImageFont.load_default(size=size)                # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    return lines + [line]


def overview_page(path, header, columns, rows, table, cell=128):
    """Write the page to `path`. header: lines of text at the top; columns: one label per level; rows: (prompt,
    [(real PIL image, generated PIL image) per column]); table: {row name: evaluate_probe figures}. Images are
    enlarged to `cell` pixels with nearest-neighbour sampling (every pixel the model made stays visible)."""
    font, small = _font(15), _font(12)
    label_w, gap, pad = 300, 14, 10
    pair_w = 2 * cell + 4 + gap
    top = pad + 22 * len(header) + 44
    table_h = 30 + 22 * (len(table) + 1)
    width = label_w + pair_w * len(columns) + pad
    page = Image.new("RGB", (width, top + len(rows) * (cell + 8) + table_h), "white")
    d = ImageDraw.Draw(page)
    for k, line in enumerate(header):
        d.text((pad, pad + 22 * k), line, fill="black", font=font)
    for j, name in enumerate(columns):
        x = label_w + j * pair_w
        d.text((x, top - 40), name, fill="black", font=font)
        d.text((x, top - 18), "real render", fill="gray", font=small)
        d.text((x + cell + 4, top - 18), "generated", fill="gray", font=small)
    for i, (prompt, pairs) in enumerate(rows):
        y = top + i * (cell + 8)
        for k, line in enumerate(_wrap(prompt, 40)[:8]):
            d.text((pad, y + 4 + 15 * k), line, fill="black", font=small)
        for j, (real, generated) in enumerate(pairs):
            x = label_w + j * pair_w
            page.paste(real.resize((cell, cell), Image.NEAREST), (x, y))
            page.paste(generated.resize((cell, cell), Image.NEAREST), (x + cell + 4, y))
    y = top + len(rows) * (cell + 8) + 14
    cols_x = [label_w + 130 * k for k in range(len(FIGURES))]
    d.text((pad, y), "probe (evaluation/probe.py)", fill="black", font=font)
    for x, (head, _, _) in zip(cols_x, FIGURES):
        d.text((x, y), head, fill="black", font=font)
    for k, (name, figures) in enumerate(table.items()):
        row_y = y + 22 * (k + 1)
        d.text((pad, row_y), name, fill="black", font=small)
        for x, (_, key, fmt) in zip(cols_x, FIGURES):
            d.text((x, row_y), fmt.format(figures[key]), fill="black", font=small)
    page.save(path)
