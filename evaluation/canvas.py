"""How visible the tile borders of a canvas are (model/editing.extend).

    # 1.0 = invisible; independent tiles side by side measure ~4-5
    ratio = seam_ratio(image, origins, tile)

The seam ratio is the mean absolute difference between the two pixel rows (columns) that meet at a
tile border, divided by the same statistic between neighbouring rows (columns) everywhere else:
natural texture varies from one row to the next, and a border counts only by how much more it varies
there. A latent diffusion model's VAE decoder upsamples each latent pixel to f x f pixels, so
neighbouring lines differ more where they straddle two latent pixels (every f-th line) than inside
one; tile borders always lie on that grid, so with period = f the "everywhere else" lines are those
on it too (without it, one pass of the model at the canvas's size reads ~1.27 at the demo's
borders instead of ~1.0).
"""

import torch


def border_lines(origins, tile, size):
    """The pixel rows and columns (H, W) where a tile starts or ends inside the canvas: sets of
    indices i, each the border between line i - 1 and line i."""
    H, W = size
    rows = {y for y, _ in origins if y > 0} | {y + tile for y, _ in origins if y + tile < H}
    cols = {x for _, x in origins if x > 0} | {x + tile for _, x in origins if x + tile < W}
    return rows, cols


def seam_ratio(image, origins, tile, period=1):
    """image (1, 3, H, W) or (3, H, W) in any range; origins the tiles' top-left corners (pixels);
    tile its size; period: compare with the lines i (the border between line i - 1 and i) with i %
    period == 0 only (the VAE's downsampling factor, see above). Returns the seam ratio (float); nan
    for a canvas of one tile."""
    x = image.float().reshape(-1, *image.shape[-2:])  # C, H, W
    rows, cols = border_lines(origins, tile, x.shape[1:])
    if not rows and not cols:
        return float("nan")
    dy = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 2))  # H-1: between row i and i+1
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1))  # W-1
    at_y = torch.zeros_like(dy, dtype=torch.bool)
    at_x = torch.zeros_like(dx, dtype=torch.bool)
    at_y[[r - 1 for r in rows]] = True
    at_x[[c - 1 for c in cols]] = True
    on_y = (torch.arange(1, len(dy) + 1) % period) == 0  # line i - 1 | i with i % period == 0
    on_x = (torch.arange(1, len(dx) + 1) % period) == 0
    border = torch.cat([dy[at_y], dx[at_x]])
    inside = torch.cat([dy[~at_y & on_y], dx[~at_x & on_x]])
    return float(border.mean() / inside.mean())
