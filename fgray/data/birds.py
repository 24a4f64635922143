"""The birds of the embedded dataset (`fgray.data.synth`): which classes exist and how one
image of a class is drawn.

What makes it fine-grained: every class is a unique combination of five small local parts
(bill shape, wing pattern, eye-ring colour, tail shape, crown patch), and the classes are
chosen by farthest-point sampling in Hamming distance so they differ in as many parts as
the class count allows. Everything that dominates an image -- body and wing colours, pose,
scale, position, cluttered backgrounds, distractor shapes, occluders, lighting -- is drawn
from one distribution for all classes. The class-bearing colours (eye ring, crown) are tiny
and are also scattered over backgrounds and distractors, so global colour statistics do not
separate classes; a model must look at the parts.

Determinism: an image depends only on (seed, image index) and the class definitions, which
depend only on (seed, classes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Tags keep the per-purpose random streams apart even for equal (seed, index) pairs (the
# split's tag is in fgray.data.synth).
_IMAGE_TAG, _CLASS_TAG = 0x1A6E, 0xC1A5

# Class-bearing colours; backgrounds and distractors draw from the same ones on purpose.
_PART_COLOURS = {
    "white": (235, 235, 230),
    "red": (210, 40, 35),
    "yellow": (240, 200, 30),
    "blue": (40, 90, 220),
}


@dataclass(frozen=True)
class Factor:
    """One class-distinguishing part: its CUB-style attribute name and its levels."""

    attribute: str  # "has_bill_shape" -> attributes "has_bill_shape::<level>"
    levels: tuple[str, ...]
    words: tuple[str, ...]  # one word per level, joined into the class name


FACTORS: tuple[Factor, ...] = (
    Factor("has_bill_shape", ("short", "long", "hooked", "conical"),
           ("Shortbill", "Longbill", "Hookbill", "Conebill")),
    Factor("has_wing_pattern", ("plain", "single_bar", "double_bar", "spotted"),
           ("Plainwing", "Barwing", "Twobar", "Spotwing")),
    # Eye and crown are told apart by shape, not colour: the SSL augmentations (colour
    # jitter, grayscale) teach an encoder to ignore colour, so a colour-coded class would be
    # one no augmentation-invariant method can learn. Their colours are drawn per image.
    Factor("has_eye_pattern", ("plain", "ring", "stripe", "mask"),
           ("Plaineye", "Ringeye", "Stripeeye", "Maskeye")),
    Factor("has_tail_shape", ("forked", "rounded", "pointed", "squared"),
           ("Forktail", "Roundtail", "Pintail", "Squaretail")),
    Factor("has_crown_shape", ("smooth", "crest", "cap", "plumes"),
           ("Smoothcap", "Crested", "Capped", "Plumed")),
)
MAX_CLASSES = math.prod(len(f.levels) for f in FACTORS)

# The 15 CUB part names, in CUB's order. The bird is drawn in side view: the far-side eye and
# wing are hidden (visible=0), as in CUB where a bird facing left shows its left side.
PART_NAMES = ("back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
              "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat")


def class_combinations(classes: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Pick `classes` unique level combinations, greedily maximising the smallest pairwise
    Hamming distance (farthest-point sampling over a seed-shuffled list of all combinations).
    """
    every = np.array(list(itertools.product(*(range(len(f.levels)) for f in FACTORS))))
    every = every[np.random.default_rng([seed, _CLASS_TAG]).permutation(len(every))]
    chosen = [0]
    nearest = (every != every[0]).sum(1)
    for _ in range(classes - 1):
        pick = int(np.argmax(nearest))  # first maximum: deterministic tie-break
        chosen.append(pick)
        nearest = np.minimum(nearest, (every != every[pick]).sum(1))
    return [tuple(int(v) for v in every[i]) for i in chosen]


def class_name(combo: tuple[int, ...]) -> str:
    return "_".join(f.words[level] for f, level in zip(FACTORS, combo))


def class_attributes(combo: tuple[int, ...]) -> list[str]:
    return [f"{f.attribute}::{f.levels[level]}" for f, level in zip(FACTORS, combo)]


def attribute_names() -> list[str]:
    return [f"{f.attribute}::{level}" for f in FACTORS for level in f.levels]


# ---------------------------------------------------------------------------------------------
# Drawing. The bird lives in canonical coordinates: body length ~1, facing right, y down.


def _ellipse(cx: float, cy: float, a: float, b: float, rot: float = 0.0, n: int = 24,
             t0: float = 0.0, t1: float = 2 * math.pi) -> np.ndarray:
    t = np.linspace(t0, t1, n, endpoint=t1 - t0 < 2 * math.pi - 1e-9)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


_BODY = _ellipse(0.0, 0.02, 0.40, 0.22, rot=-0.17, n=32)
_HEAD_C, _HEAD_R = (0.40, -0.22), 0.18
_HEAD = _ellipse(*_HEAD_C, _HEAD_R, _HEAD_R, n=24)
_EYE_C = (0.47, -0.25)
# Parts are drawn large enough to survive a 64-96 px view of the whole bird.
_EYE_RING = _ellipse(*_EYE_C, 0.095, 0.095, n=16)
_PUPIL = _ellipse(*_EYE_C, 0.042, 0.042, n=10)
_EYE_STRIPE = np.array([(0.30, -0.29), (0.62, -0.28), (0.62, -0.22), (0.30, -0.21)])
_EYE_MASK = _ellipse(0.49, -0.24, 0.13, 0.085, rot=0.1, n=18)
_CROWN_SHAPES = (
    (),  # smooth
    (np.array([(0.28, -0.36), (0.22, -0.62), (0.46, -0.38)]),),  # crest
    (_ellipse(0.38, -0.35, 0.16, 0.075, n=18),),  # cap
    (np.array([(0.30, -0.38), (0.02, -0.52), (0.06, -0.46), (0.33, -0.33)]),
     np.array([(0.34, -0.39), (0.08, -0.60), (0.12, -0.54), (0.38, -0.35)])),  # plumes
)
_WING_C, _WING_AB, _WING_ROT = (-0.06, -0.02), (0.30, 0.13), -0.17
_WING = _ellipse(*_WING_C, *_WING_AB, rot=_WING_ROT, n=28)
_LEGS = (((0.02, 0.20), (0.00, 0.44)), ((-0.10, 0.20), (-0.13, 0.44)))  # near, far
_BEAKS = (
    np.array([(0.55, -0.26), (0.70, -0.22), (0.55, -0.18)]),  # short
    np.array([(0.55, -0.25), (0.93, -0.21), (0.55, -0.18)]),  # long
    np.array([(0.55, -0.28), (0.70, -0.28), (0.78, -0.22), (0.77, -0.12), (0.72, -0.18),
              (0.55, -0.17)]),  # hooked
    np.array([(0.53, -0.33), (0.77, -0.22), (0.53, -0.11)]),  # conical
)
_TAILS = (
    np.array([(-0.34, -0.06), (-0.80, -0.22), (-0.62, -0.02), (-0.80, 0.16), (-0.34, 0.08)]),
    np.concatenate([[(-0.34, -0.06)], _ellipse(-0.50, 0.01, 0.22, 0.15, n=14,
                                               t0=math.radians(235), t1=math.radians(125)),
                    [(-0.34, 0.08)]]),
    np.array([(-0.34, -0.06), (-0.92, 0.01), (-0.34, 0.08)]),
    np.array([(-0.34, -0.06), (-0.70, -0.13), (-0.70, 0.15), (-0.34, 0.08)]),
)


def _wing_local(x: float, y: float) -> tuple[float, float]:
    c, s = math.cos(_WING_ROT), math.sin(_WING_ROT)
    return _WING_C[0] + c * x - s * y, _WING_C[1] + s * x + c * y


def _wing_marks(pattern: int) -> list[np.ndarray]:
    """Polygons of the wing pattern in canonical coordinates."""
    a, b = _WING_AB
    marks = []
    bars = {1: (0.0,), 2: (-0.11, 0.08)}.get(pattern, ())
    for bx in bars:
        half = b * math.sqrt(max(0.0, 1 - (bx / a) ** 2)) * 0.95
        pts = [(bx - 0.05, -half), (bx + 0.05, -half), (bx + 0.05, half), (bx - 0.05, half)]
        marks.append(np.array([_wing_local(x, y) for x, y in pts]))
    if pattern == 3:
        for sx, sy in ((-0.18, -0.03), (-0.08, 0.05), (0.02, -0.05), (0.12, 0.03), (-0.05, -0.0)):
            marks.append(_ellipse(*_wing_local(sx, sy), 0.05, 0.05, n=10))
    return marks


def _part_points(combo: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """Canonical centre of every CUB part for this class (beak and tail depend on shape)."""
    beak = _BEAKS[combo[0]].mean(0)
    tail = _TAILS[combo[3]].mean(0)
    legs = [((a[0] + b[0]) / 2, b[1] - 0.02) for a, b in _LEGS]
    return {
        "back": (-0.10, -0.17), "beak": tuple(beak), "belly": (-0.02, 0.17),
        "breast": (0.26, 0.02), "crown": (0.38, -0.36), "forehead": (0.53, -0.33),
        "eye": _EYE_C, "near leg": legs[0], "far leg": legs[1], "wing": _WING_C,
        "nape": (0.24, -0.28), "tail": tuple(tail), "throat": (0.50, -0.09),
    }


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]
    return int(r * 255), int(g * 255), int(b * 255)


def _plumage_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Body colours, one distribution for every class: muted browns, olives and greys, as
    most real passerines, so plumage colour is a nuisance that does not swamp the parts."""
    return _hsv_to_rgb(rng.uniform(0.02, 0.25), rng.uniform(0.1, 0.55), rng.uniform(0.35, 0.8))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """The one colour distribution for bodies, backgrounds and distractors."""
    return _hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))


def _palette_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Half the time a class-bearing part colour (jittered), so they are common everywhere."""
    if rng.random() < 0.5:
        base = np.array(list(_PART_COLOURS.values())[rng.integers(len(_PART_COLOURS))])
        return tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))
    return _random_colour(rng)


def _contrasting(rng: np.random.Generator, against: tuple[int, int, int]) -> tuple[int, int, int]:
    """A palette colour whose luminance differs from `against` by at least a third."""
    def lum(c):
        return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]

    for _ in range(8):
        colour = _palette_colour(rng)
        if abs(lum(colour) - lum(against)) >= 85:
            return colour
    return (20, 20, 20) if lum(against) > 128 else (240, 240, 235)


def _shade(colour: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * k))) for c in colour)


def _flat(pts: np.ndarray) -> list[float]:
    return pts.ravel().tolist()


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gradient + low-frequency colour noise + optional stripes, float32 (n, n, 3)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5) + 0.5)[..., None]
    c0 = np.array(_random_colour(rng), np.float32)
    c1 = np.array(_random_colour(rng), np.float32)
    img = c0 + (c1 - c0) * ramp
    k = int(rng.integers(3, 7))
    coarse = rng.normal(0, rng.uniform(15, 45), (k, k, 3)).astype(np.float32)
    noise = np.stack([np.asarray(Image.fromarray(coarse[..., i], mode="F").resize(
        (n, n), Image.BICUBIC)) for i in range(3)], -1)
    img += noise
    if rng.random() < 0.25:
        ang = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 12)
        phase = np.sin(2 * math.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy)
                       + rng.uniform(0, 2 * math.pi))
        stripe = (phase > rng.uniform(-0.3, 0.6))[..., None]
        colour = np.array(_palette_colour(rng), np.float32)
        alpha = rng.uniform(0.25, 0.7)
        img = np.where(stripe, img * (1 - alpha) + colour * alpha, img)
    return img


def _distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int) -> None:
    """Blobs, polygons, branches, decoy bodies and eye-like rings, all class-independent."""
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.integers(5)
        cx, cy = rng.uniform(0, n, 2)
        r = rng.uniform(0.03, 0.16) * n
        if kind == 0:  # blob
            pts = _ellipse(cx, cy, r, r * rng.uniform(0.4, 1.0), rot=rng.uniform(0, 6.3))
            draw.polygon(_flat(pts), fill=_palette_colour(rng))
        elif kind == 1:  # polygon
            ang = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 6))))
            rad = r * rng.uniform(0.5, 1.2, len(ang))
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
            draw.polygon(_flat(pts), fill=_palette_colour(rng))
        elif kind == 2:  # branch
            ang = rng.uniform(0, math.pi)
            length = rng.uniform(0.2, 0.6) * n
            end = (cx + length * math.cos(ang), cy + length * math.sin(ang))
            draw.line([(cx, cy), end], fill=_shade(_random_colour(rng), 0.6),
                      width=max(1, int(rng.uniform(0.01, 0.03) * n)))
        elif kind == 3:  # decoy body: the bird's silhouette colour without its parts
            pts = _ellipse(cx, cy, r * 1.3, r * 0.7, rot=rng.uniform(0, 6.3))
            draw.polygon(_flat(pts), fill=_random_colour(rng))
        else:  # small ring, like an eye ring or a crown patch
            rr = rng.uniform(0.015, 0.035) * n
            draw.polygon(_flat(_ellipse(cx, cy, rr, rr, n=14)), fill=_palette_colour(rng))
            draw.polygon(_flat(_ellipse(cx, cy, rr * 0.45, rr * 0.45, n=10)),
                         fill=_shade(_random_colour(rng), 0.3))


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    box: tuple[float, float, float, float]  # x, y, width, height in pixels
    parts: list[tuple[float, float, int]]  # per PART_NAMES: x, y, visible (0, 0, 0 if hidden)


def render_image(combo: tuple[int, ...], size: int, seed: int, index: int) -> Rendered:
    """Draw image `index` of class `combo`; its randomness comes from (seed, index) only."""
    rng = np.random.default_rng([seed, index, _IMAGE_TAG])
    n = 2 * size  # draw at 2x, then box-downsample: cheap antialiasing
    canvas = Image.fromarray(np.clip(_background(rng, n), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    _distractors(draw, rng, n)

    # Pose: scale, rotation, mirror, then a position that keeps the bird (nearly) inside.
    scale = rng.uniform(0.5, 0.72) * n
    theta = rng.uniform(-0.35, 0.35)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(theta), math.sin(theta)
    centre = np.zeros(2)

    def tf(pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        x, y = pts[:, 0] * flip, pts[:, 1]
        return np.stack([c * x - s * y, s * x + c * y], 1) * scale + centre

    beak_i, wing_i, eye_i, tail_i, crown_i = combo
    extent = np.concatenate([tf(_BODY), tf(_HEAD), tf(_TAILS[tail_i]), tf(_BEAKS[beak_i]),
                             tf(np.array(_LEGS).reshape(-1, 2))])
    slack = 0.03 * n  # a bill or tail tip may cross the border now and then
    lo, hi = -extent.min(0) - slack, n - extent.max(0) + slack
    centre = np.where(lo < hi, lo + rng.random(2) * (hi - lo), n / 2)

    body = _plumage_colour(rng)
    wing = _shade(body, rng.uniform(0.45, 0.7)) if rng.random() < 0.7 else _plumage_colour(rng)
    outline = _shade(body, 0.35)
    mark = _hsv_to_rgb(rng.uniform(0.1, 0.2), rng.uniform(0.0, 0.3), rng.uniform(0.85, 1.0))
    beak = _hsv_to_rgb(rng.uniform(0.02, 0.15), rng.uniform(0.0, 0.8), rng.uniform(0.1, 0.8))
    leg = _shade(_random_colour(rng), 0.4)
    ow = max(1, round(n / 128))

    shapes = [tf(_BODY), tf(_HEAD), tf(_TAILS[tail_i]), tf(_BEAKS[beak_i])]
    leg_w = max(1, round(0.03 * scale))
    for a, b in _LEGS[::-1]:
        draw.line(_flat(tf([a, b])), fill=leg, width=leg_w)
    draw.polygon(_flat(shapes[2]), fill=wing, outline=outline, width=ow)
    draw.polygon(_flat(shapes[0]), fill=body, outline=outline, width=ow)
    if rng.random() < 0.5:  # paler belly, class-independent
        belly = _ellipse(0.05, 0.10, 0.28, 0.11, rot=-0.17)
        draw.polygon(_flat(tf(belly)), fill=_shade(body, rng.uniform(1.15, 1.5)))
    draw.polygon(_flat(tf(_WING)), fill=wing, outline=outline, width=ow)
    for m in _wing_marks(wing_i):
        draw.polygon(_flat(tf(m)), fill=mark)
    # Crown and eye marks: their shape is the class, their colours are any palette colour
    # that stands out from the head (light on a dark head, dark on a light one).
    crown_colour, eye_colour = (_contrasting(rng, body) for _ in range(2))
    for crown in _CROWN_SHAPES[crown_i]:
        draw.polygon(_flat(tf(crown)), fill=crown_colour, outline=outline, width=ow)
    draw.polygon(_flat(shapes[1]), fill=body, outline=outline, width=ow)
    if crown_i == 2:  # a cap lies on the head, so it is drawn after it
        draw.polygon(_flat(tf(_CROWN_SHAPES[2][0])), fill=crown_colour)
    eye_mark = {1: _EYE_RING, 2: _EYE_STRIPE, 3: _EYE_MASK}.get(eye_i)
    if eye_mark is not None:
        draw.polygon(_flat(tf(eye_mark)), fill=eye_colour)
    draw.polygon(_flat(tf(_PUPIL)), fill=(15, 15, 15))
    draw.polygon(_flat(shapes[3]), fill=beak, outline=_shade(beak, 0.5), width=ow)

    # Occluder in front of the bird, sometimes; the part visibility reads its mask.
    mask = None
    if rng.random() < 0.15:
        mask = Image.new("L", (n, n), 0)
        mdraw = ImageDraw.Draw(mask)
        ox, oy = centre + rng.uniform(-0.45, 0.45, 2) * scale
        occ = _ellipse(ox, oy, rng.uniform(0.1, 0.22) * scale, rng.uniform(0.05, 0.1) * scale,
                       rot=rng.uniform(0, 6.3))
        draw.polygon(_flat(occ), fill=_palette_colour(rng))
        mdraw.polygon(_flat(occ), fill=255)

    small = canvas.reduce(2)
    arr = np.asarray(small, np.float32)
    # Lighting: a brightness gradient, a contrast change and sensor noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)
    gain = rng.uniform(0.75, 1.2) + rng.uniform(-0.35, 0.35) * ramp
    mean = arr.mean((0, 1))
    arr = (arr - mean) * rng.uniform(0.7, 1.2) + mean
    arr = arr * gain[..., None] + rng.normal(0, rng.uniform(0, 6), arr.shape)
    image = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))

    # Box: the bird's extent (legs included), clipped to the image, in 1x pixels.
    outline_pts = np.concatenate(shapes + [tf(np.array(_LEGS).reshape(-1, 2))]) / 2
    lo = np.clip(outline_pts.min(0), 0, size)
    hi = np.clip(outline_pts.max(0), 0, size)
    box = (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))

    canon = _part_points(combo)
    near = "left" if flip < 0 else "right"  # a bird facing left shows its left side
    parts: list[tuple[float, float, int]] = []
    for name in PART_NAMES:
        side, _, what = name.rpartition(" ")
        if what == "leg":  # both legs are drawn side by side
            key = "near leg" if side == near else "far leg"
        elif side and side != near:
            parts.append((0.0, 0.0, 0))
            continue
        else:
            key = what
        px, py = tf(np.array(canon[key]))[0]
        visible = 0 <= px < n and 0 <= py < n
        if visible and mask is not None and mask.getpixel((int(px), int(py))):
            visible = False
        parts.append((float(px / 2), float(py / 2), 1) if visible else (0.0, 0.0, 0))
    return Rendered(image, box, parts)

