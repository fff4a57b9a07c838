"""Training masks for the inpainting U-Net: a mixture of the holes remote-sensing edits leave
(1 = regenerate).

    full        the whole image: the model still generates from scratch (text-to-image)
    rectangles  1-3 boxes of 10-50% of each side: box edits
    strokes     free-form brush strokes, polylines of random width
                (the idea of DeepFill v2's and LaMa's masks)
    clouds      a smooth random field thresholded at 20-70% coverage: cloud cover to fill in
    outpaint    a band of 25-75% of the image along one side: the next tile of an unbounded scene

Each mask reads its parameters from one fixed block of PARAMS uniforms, drawn for every mask
whatever its kind and size: n masks take the same numbers from the generator whatever H, W and MIX
are, and the first k of n masks are the k masks of a draw of k. Geometry is in fractions of the
image (brush strokes: of its shorter side), so a mask looks the same at any size. Shapes: n masks, m
of one kind, H, W pixels.
"""

import math

import torch
import torch.nn.functional as F

# shares (any scale)
MIX = {"full": 0.2, "rectangles": 0.15, "strokes": 0.25, "clouds": 0.2, "outpaint": 0.2}

MAX_BOXES = 3
MAX_STROKES, MAX_SEGMENTS = 5, 4
CLOUD_OCTAVES = (4, 8, 16)  # noise grids, amplitude halving per octave: fractal, cloud-like


def _centres(H, W, device):
    """Pixel centres as fractions of the image: ys (H, 1), xs (1, W) in (0, 1)."""
    ys = (torch.arange(H, device=device) + 0.5) / H
    xs = (torch.arange(W, device=device) + 0.5) / W
    return ys[:, None], xs[None, :]


def full(u, H, W):
    """(m, 0) -> (m, H, W): everything."""
    return torch.ones(u.shape[0], H, W, dtype=torch.bool, device=u.device)


def rectangles(u, H, W):
    """(m, 1 + 4 * MAX_BOXES) -> (m, H, W): 1-3 boxes,
    each 10-50% of the height and of the width."""
    ys, xs = _centres(H, W, u.device)
    count = 1 + (u[:, 0] * MAX_BOXES).long()  # m
    box = u[:, 1:].view(-1, MAX_BOXES, 4)  # m, boxes, (h, w, top, left)
    out = torch.zeros(u.shape[0], H, W, dtype=torch.bool, device=u.device)
    for k in range(MAX_BOXES):
        h, w = 0.1 + 0.4 * box[:, k, 0, None, None], 0.1 + 0.4 * box[:, k, 1, None, None]  # m, 1, 1
        top, left = box[:, k, 2, None, None] * (1 - h), box[:, k, 3, None, None] * (1 - w)
        inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)  # m, H, W
        out |= inside & (k < count)[:, None, None]
    return out


def strokes(u, H, W):
    """(m, 1 + 13 * MAX_STROKES) -> (m, H, W): 1-5 brush strokes, each a polyline of 1-4 segments
    from a random start, turning up to 90 degrees at each vertex, segments 10-40% and the brush
    4-20% of the shorter side."""
    m, side = u.shape[0], min(H, W)
    ys, xs = (
        (torch.arange(H, device=u.device) + 0.5)[:, None],
        (torch.arange(W, device=u.device) + 0.5)[None, :],
    )
    count = 1 + (u[:, 0] * MAX_STROKES).long()  # m
    p = u[:, 1:].view(m, MAX_STROKES, 5 + 2 * MAX_SEGMENTS)
    out = torch.zeros(m, H, W, dtype=torch.bool, device=u.device)
    for k in range(MAX_STROKES):
        q = p[:, k]  # m, 13
        x, y, heading = q[:, 0] * W, q[:, 1] * H, q[:, 2] * 2 * math.pi  # pixels
        segments = 1 + (q[:, 3] * MAX_SEGMENTS).long()
        # >= 0.75 px: always hits a centre
        radius = ((0.02 + 0.08 * q[:, 4]) * side).clamp(min=0.75)
        for j in range(MAX_SEGMENTS):
            heading = heading + (q[:, 5 + 2 * j] - 0.5) * math.pi
            length = (0.1 + 0.3 * q[:, 6 + 2 * j]) * side
            x2, y2 = (
                (x + length * heading.cos()).clamp(0, W),
                (y + length * heading.sin()).clamp(0, H),
            )
            on = (k < count) & (j < segments)  # m
            out |= on[:, None, None] & (
                _distance_to_segment(xs, ys, x, y, x2, y2) <= radius[:, None, None]
            )
            x, y = x2, y2
    return out


def _distance_to_segment(xs, ys, x1, y1, x2, y2):
    """Distance of every pixel centre (xs (1, W), ys (H, 1)) to the segments (x1, y1)-(x2, y2),
    each (m,): (m, H, W)."""
    x1, y1, x2, y2 = (v[:, None, None] for v in (x1, y1, x2, y2))
    dx, dy = x2 - x1, y2 - y1
    # m, H, W
    t = (((xs - x1) * dx + (ys - y1) * dy) / (dx * dx + dy * dy).clamp(min=1e-8)).clamp(0, 1)
    return torch.hypot(xs - x1 - t * dx, ys - y1 - t * dy)


def clouds(u, H, W):
    """(m, 1 + sum(o * o for o in CLOUD_OCTAVES)) -> (m, H, W): fractal noise (uniform grids of each
    octave, bilinearly upsampled, amplitude halving) whose top 20-70% (the coverage, exact up to
    ties) is the mask."""
    m = u.shape[0]
    field, at = torch.zeros(m, 1, H, W, device=u.device), 1
    for i, o in enumerate(CLOUD_OCTAVES):
        grid = u[:, at : at + o * o].view(m, 1, o, o)
        field += 0.5**i * F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=True)
        at += o * o
    coverage = 0.2 + 0.5 * u[:, 0]  # m
    keep = ((1 - coverage) * H * W).round().long().clamp(0, H * W - 1)  # pixels below the threshold
    threshold = field.flatten(1).sort(dim=1).values.gather(1, keep[:, None])  # m, 1
    return field[:, 0] >= threshold[:, :, None]


def outpaint(u, H, W):
    """(m, 2) -> (m, H, W): a band of 25-75% of the image along the top, bottom,
    left or right side."""
    ys, xs = _centres(H, W, u.device)
    ys, xs = ys.expand(H, W), xs.expand(H, W)
    from_side = torch.stack([ys, 1 - ys, xs, 1 - xs])  # 4, H, W: top, bottom, left, right
    side = (u[:, 0] * 4).long()  # m
    return from_side[side] < (0.25 + 0.5 * u[:, 1])[:, None, None]


KINDS = {
    "full": full,
    "rectangles": rectangles,
    "strokes": strokes,
    "clouds": clouds,
    "outpaint": outpaint,
}
# uniforms each kind reads
SIZES = {
    "full": 0,
    "rectangles": 1 + 4 * MAX_BOXES,
    "strokes": 1 + (5 + 2 * MAX_SEGMENTS) * MAX_STROKES,
    "clouds": 1 + sum(o * o for o in CLOUD_OCTAVES),
    "outpaint": 2,
}
PARAMS = 1 + sum(SIZES.values())  # the kind, then every kind's block


def draw_params(n, generator):
    """The (n, PARAMS) uniforms of n masks: what the generator gives,
    whatever the sizes and kinds."""
    return torch.rand(n, PARAMS, generator=generator)


def kinds_of(params):
    """(n, PARAMS) -> (n,) index of each mask's kind in KINDS, picked by the first uniform with
    MIX's shares (a kind MIX leaves out has none)."""
    if not set(MIX) <= set(KINDS) or sum(MIX.values()) <= 0:
        raise ValueError(f"masks.MIX: shares of {list(KINDS)}, not all zero; got {MIX}")
    shares = torch.tensor([float(MIX.get(k, 0.0)) for k in KINDS], dtype=torch.float64)
    edges = (shares.cumsum(0) / shares.sum())[:-1].to(params.device)
    return torch.bucketize(params[:, 0].double(), edges, right=True)


def render(params, H, W):
    """(n, PARAMS) -> masks (n, 1, H, W) float of 0 (keep) and 1 (regenerate),
    on the device of params."""
    kind = kinds_of(params)
    out = torch.zeros(params.shape[0], H, W, dtype=torch.bool, device=params.device)
    at = 1
    for i, (name, fn) in enumerate(KINDS.items()):
        sel = kind == i
        if sel.any():
            out[sel] = fn(params[sel, at : at + SIZES[name]], H, W)
        at += SIZES[name]
    return out[:, None].float()


def random_masks(n, H, W, generator, idx=None, device=None):
    """Masks (n, 1, H, W) of 0 (keep) and 1 (regenerate) drawn from MIX for a global batch of n;
    with idx, only the masks at those positions (len(idx), 1, H, W), the draws unchanged. Rendered
    on `device` (default CPU)."""
    params = draw_params(n, generator)
    if idx is not None:
        params = params[idx]
    return render(params.to(device or "cpu"), H, W)
