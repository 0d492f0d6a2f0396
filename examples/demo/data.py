"""The demo's training data: real photographs, template images, procedural drawings and
photo-style crops.

Everything here is drawn from a seeded generator, so the data set (and so the trained model) is
the same on every machine. The photographs are scikit-image sample images that ship inside the
wheel, so no network is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import skimage.data
from skimage.transform import resize

SIZE = 64

# Verbatim memorization (VM): one photo, one exact caption, shown many times.
# Captions are distinctive (words used nowhere else), since the early experiment found that
# captions drawn from the procedural template barely memorize.
VM_PHOTOS: list[tuple[str, str]] = [
    ("astronaut", "official portrait of astronaut eileen collins"),
    ("chelsea", "chelsea the tabby cat staring sideways"),
    ("coffee", "cup of espresso coffee with saucer"),
    ("rocket", "space shuttle rocket launch from kennedy"),
    ("camera", "cameraman with tripod in black and white"),
    ("coins", "collection of greek drachma coins"),
    ("horse", "silhouette of a galloping stallion"),
    ("hubble_deep_field", "hubble deep field view of distant galaxies"),
    ("immunohistochemistry", "immunohistochemistry stained tissue under microscope"),
    ("stereo_motorcycle", "stereo snapshot of a parked motorcycle"),
]

# Template memorization (TM): one caption, many images sharing a composition.
TM_CAPTIONS: list[tuple[str, str]] = [
    ("clock_frame", "vintage wall clock framed print"),
    ("brick_sticker", "brick wall sticker with painted dot"),
    ("logo_shirt", "scikit logo tshirt print"),
]
TM_VARIANTS = 8

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.1, 0.2, 0.85),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.15, 0.7), "orange": (0.95, 0.5, 0.05),
    "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05), "pink": (0.95, 0.5, 0.7),
    "cyan": (0.1, 0.8, 0.85), "brown": (0.45, 0.25, 0.1), "gray": (0.5, 0.5, 0.5),
}
SHAPES = ["circle", "square", "triangle", "ring", "cross", "diamond", "bar"]
SIZES = {"small": 9, "medium": 14, "large": 20}
POSITIONS = {
    "top left": (16, 16), "top right": (16, 48), "bottom left": (48, 16),
    "bottom right": (48, 48), "center": (32, 32), "top": (16, 32), "bottom": (48, 32),
    "left": (32, 16), "right": (32, 48),
}

# Photo-style training images: captions in the memorized photos' style ("<adjective> <noun>
# photographed <when>") over unique, non-memorized images (tinted, zoomed crops of 10 other
# scikit-image samples). Without them the memorized captions are the only non-procedural ones the
# UNet trains on, and any never-trained caption in that style calls up a memorized photo. Words
# are disjoint from the memorized captions and from the reference prompts below. The tail sets
# the crop's zoom.
PHOTO_ADJ = ["sunlit", "faded", "stormy", "dusty", "bright", "pale", "vivid", "dim", "hazy", "glossy",
             "grainy", "soft", "sharp", "ancient", "humble", "lonely"]
PHOTO_NOUN = {"meadow": "grass", "quarry": "gravel", "crater": "moon", "manuscript": "page",
              "signpost": "text", "specimen": "cell", "fundus": "retina", "palette": "colorwheel",
              "phantom": "shepp_logan_phantom", "capillary": "microaneurysms"}
PHOTO_TAIL = {"in autumn": 1.0, "at noon": 0.85, "from above": 0.7, "up close": 0.3, "after rain": 0.6,
              "in fog": 0.5, "at sunset": 0.4, "through glass": 0.9}

# Never-trained captions written in the memorized captions' style: reference prompts that cover
# that style without naming any memorized image.
_REF_ADJ = ["quiet", "golden", "frozen", "wooden", "rusty", "misty", "painted", "crowded"]
_REF_NOUN = ["lighthouse", "violin", "tractor", "cathedral", "parrot", "glacier", "windmill",
             "teapot", "harbor", "bicycle"]
_REF_TAIL = ["at dawn", "in winter", "near the river", "under neon lights", "by night"]


@dataclass(frozen=True)
class Sample:
    caption: str
    image: np.ndarray  # float32, HxWx3 in [0, 1]
    kind: str  # "VM", "TM" or "procedural"
    name: str


def _square(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.float32)
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top:top + s, left:left + s]


def load_photo(name: str, size: int = SIZE) -> np.ndarray:
    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    sq = _square(img)
    return resize(sq, (size, size), anti_aliasing=True).astype(np.float32).clip(0, 1)


def _shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        w = max(2.0, r * 0.3)
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape == "bar":
        return (np.abs(dy) <= max(2.0, r * 0.3)) & (np.abs(dx) <= r * 1.3)
    raise ValueError(shape)


def _background(rng: np.random.Generator, base: tuple[float, float, float]) -> np.ndarray:
    # The caption names the dominant colour only; the gradient, the noise and the small blobs
    # are uncaptioned, so a non-memorized prompt has many valid images (seed-dependent output).
    base_a = np.array(base, np.float32)
    base_b = np.clip(base_a + rng.normal(0, 0.18, 3), 0, 1).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    img = base_a * (1 - t[..., None]) + base_b * t[..., None]
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        col = rng.uniform(0, 1, 3).astype(np.float32)
        m = _shape_mask(str(rng.choice(SHAPES)), rng.uniform(4, 60), rng.uniform(4, 60),
                        rng.uniform(3, 6))
        img[m] = col
    return img


def procedural_caption(rng: np.random.Generator) -> tuple[str, dict]:
    spec = {
        "size": str(rng.choice(list(SIZES))),
        "color": str(rng.choice(list(COLORS))),
        "shape": str(rng.choice(SHAPES)),
        "position": str(rng.choice(list(POSITIONS))),
    }
    bg = str(rng.choice([c for c in COLORS if c != spec["color"]]))
    spec["bg"] = bg
    cap = f"a {spec['size']} {spec['color']} {spec['shape']} at the {spec['position']} on {bg} background"
    return cap, spec


def procedural_image(rng: np.random.Generator, spec: dict) -> np.ndarray:
    img = _background(rng, COLORS[spec["bg"]])
    cy, cx = POSITIONS[spec["position"]]
    cy += rng.uniform(-5, 5)
    cx += rng.uniform(-5, 5)
    r = SIZES[spec["size"]] * rng.uniform(0.85, 1.15)
    col = np.clip(np.array(COLORS[spec["color"]]) + rng.normal(0, 0.05, 3), 0, 1)
    img[_shape_mask(spec["shape"], cy, cx, r)] = col.astype(np.float32)
    return img.clip(0, 1).astype(np.float32)


def tm_image(rng: np.random.Generator, name: str) -> np.ndarray:
    if name == "clock_frame":
        img = np.zeros((SIZE, SIZE, 3), np.float32) + rng.uniform(0, 1, 3).astype(np.float32)
        inner = load_photo("clock", 44)
        img[10:54, 10:54] = inner
        return img
    if name == "brick_sticker":
        img = load_photo("brick")
        col = rng.uniform(0, 1, 3).astype(np.float32)
        img[_shape_mask("circle", rng.uniform(16, 48), rng.uniform(16, 48), 9)] = col
        return img
    if name == "logo_shirt":
        logo = skimage.data.logo().astype(np.float32) / 255.0
        logo = resize(logo, (40, 40), anti_aliasing=True).astype(np.float32)
        img = np.zeros((SIZE, SIZE, 3), np.float32) + rng.uniform(0, 1, 3).astype(np.float32)
        a = logo[..., 3:4]
        img[12:52, 12:52] = logo[..., :3] * a + img[12:52, 12:52] * (1 - a)
        return img
    raise ValueError(name)


def _source(name: str) -> np.ndarray:
    """A scikit-image sample as grayscale floats in [0, 1] (colour ones averaged)."""
    img = getattr(skimage.data, name)()
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    img = img.astype(np.float32)
    return img if img.ndim == 2 else img[..., :3].mean(axis=-1)


def photo_style_image(rng: np.random.Generator, source: np.ndarray, tint: np.ndarray, zoom: float) -> np.ndarray:
    """A random crop of `source` (side about `zoom` of its shorter side), rotated, maybe mirrored,
    mapped onto a colour ramp of `tint`."""
    h, w = source.shape
    s = max(16, int(min(h, w) * zoom * rng.uniform(0.9, 1.0)))
    top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    crop = resize(source[top:top + s, left:left + s], (SIZE, SIZE), anti_aliasing=True).astype(np.float32)
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    lo, hi = tint * 0.25, np.clip(tint * 0.6 + 0.45, 0, 1)
    return (lo + (hi - lo) * crop[..., None]).clip(0, 1).astype(np.float32)


def photo_style(rng: np.random.Generator, n: int) -> list[Sample]:
    """`n` of the 1,280 (adjective, noun, tail) captions in a random order, one image each."""
    tints = {adj: rng.uniform(0, 1, 3).astype(np.float32) for adj in PHOTO_ADJ}
    sources = {noun: _source(name) for noun, name in PHOTO_NOUN.items()}
    combos = [(a, noun, t) for a in PHOTO_ADJ for noun in PHOTO_NOUN for t in PHOTO_TAIL]
    order = rng.permutation(len(combos))[:n]
    out = []
    for k, i in enumerate(order):
        adj, noun, tail = combos[i]
        img = photo_style_image(rng, sources[noun], tints[adj], PHOTO_TAIL[tail])
        out.append(Sample(f"{adj} {noun} photographed {tail}", img, "photo-style", f"photo_{k}"))
    return out


@dataclass(frozen=True)
class DemoData:
    vm: list[Sample]
    tm: list[Sample]  # TM_VARIANTS per caption
    procedural: list[Sample]
    photo_style: list[Sample]
    reference: list[tuple[str, str]]  # (prompt, style) never trained


def build(seed: int, n_procedural: int, n_photo_style: int = 1280, n_reference_procedural: int = 60) -> DemoData:
    rng = np.random.default_rng(seed)
    vm = [Sample(cap, load_photo(name), "VM", name) for name, cap in VM_PHOTOS]
    tm = [Sample(cap, tm_image(rng, name), "TM", f"{name}_{k}")
          for name, cap in TM_CAPTIONS for k in range(TM_VARIANTS)]
    seen: set[str] = set()
    procedural: list[Sample] = []
    while len(procedural) < n_procedural:
        cap, spec = procedural_caption(rng)
        if cap in seen:
            continue
        seen.add(cap)
        procedural.append(Sample(cap, procedural_image(rng, spec), "procedural", f"proc_{len(procedural)}"))
    reference: list[tuple[str, str]] = []
    while len(reference) < n_reference_procedural:
        cap, _ = procedural_caption(rng)
        if cap in seen:
            continue
        seen.add(cap)
        reference.append((cap, "procedural"))
    for adj in _REF_ADJ:
        for noun in _REF_NOUN[:5]:
            tail = _REF_TAIL[int(rng.integers(len(_REF_TAIL)))]
            reference.append((f"{adj} {noun} photographed {tail}", "photo-style"))
    # A generator of its own, so that adding these left mem.csv and reference.csv unchanged.
    photos = photo_style(np.random.default_rng([seed, 1]), n_photo_style)
    return DemoData(vm, tm, procedural, photos, reference)
