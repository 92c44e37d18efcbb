"""Compose the simulator's images from real photos shipped inside installed packages.

Two steps, so that a 5,000-post world is cheap to generate and images cost only when asked for:

* :func:`plan_image` (at world generation, pure arithmetic, microseconds): draws every
  geometric and colour parameter of one image from the world's random stream and records
  where each face ends up in the final pixels (the *composition record*, :class:`ImagePlan`).
* :func:`render_image` (lazily, when the server is first asked for the URL, ~10-30 ms):
  executes a plan. It draws no random numbers, so the same plan always gives the same bytes.

Kinds of composition:

``face``
    One face patch (a face box from a source photo plus margin for hair and shoulders,
    feathered at its edges) scaled so the face box is ``face_share`` of the frame height and
    pasted onto a blurred background crop ("bokeh") taken from a no-face photo.
``group``
    A crop of insightface's ``t1.jpg`` group photo keeping at least three whole faces.
``noface``
    A crop of a photo with no face (cat, coffee, rocket, textures, face masks, ...).

Then, for every kind: optional horizontal flip, white-balance jitter, contrast jitter, the
saturation filter (normal / washed-out / black-and-white), the brightness factor, an optional
white border, and JPEG (quality 78-92) or PNG encoding. The quality effect of each factor is
documented in :mod:`simulator.likes`.

Face boxes of the source photos were measured once with SCRFD ``det_500m.onnx`` at 640 px
(score >= 0.7); the no-face sources were checked to give no detection with the same model.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class SourcePhoto:
    name: str
    package: str  # the installed package that ships the file
    relpath: str  # path inside that package
    faces: tuple[Box, ...] = ()


# t1.jpg is 1280x886 with six faces; boxes measured with SCRFD det_500m at 640 px.
T1_FACES: tuple[Box, ...] = (
    (55.6, 260.8, 168.6, 397.9),
    (270.0, 144.9, 371.9, 270.3),
    (463.5, 266.5, 572.7, 415.4),
    (745.3, 342.2, 847.3, 480.1),
    (906.0, 59.5, 1011.1, 206.3),
    (1130.3, 272.8, 1227.3, 400.6),
)

SOURCES: dict[str, SourcePhoto] = {
    s.name: s
    for s in (
        SourcePhoto("t1", "insightface", "data/images/t1.jpg", T1_FACES),
        # A 112x112 aligned face crop: the face box is almost the whole picture.
        SourcePhoto("tom_hanks", "insightface", "data/images/Tom_Hanks_54745.png", ((10.0, 5.0, 85.0, 112.0),)),
        SourcePhoto("astronaut", "skimage", "data/astronaut.png", ((180.1, 60.2, 271.6, 179.7),)),
        SourcePhoto("camera", "skimage", "data/camera.png", ((198.6, 116.3, 258.0, 199.8),)),
        SourcePhoto("chelsea", "skimage", "data/chelsea.png"),
        SourcePhoto("coffee", "skimage", "data/coffee.png"),
        SourcePhoto("rocket", "skimage", "data/rocket.jpg"),
        SourcePhoto("brick", "skimage", "data/brick.png"),
        SourcePhoto("grass", "skimage", "data/grass.png"),
        SourcePhoto("gravel", "skimage", "data/gravel.png"),
        SourcePhoto("motorcycle", "skimage", "data/motorcycle_left.png"),
        SourcePhoto("hubble", "skimage", "data/hubble_deep_field.jpg"),
        SourcePhoto("mask_black", "insightface", "data/images/mask_black.jpg"),
        SourcePhoto("mask_blue", "insightface", "data/images/mask_blue.jpg"),
        SourcePhoto("mask_green", "insightface", "data/images/mask_green.jpg"),
        SourcePhoto("mask_white", "insightface", "data/images/mask_white.jpg"),
    )
}

#: (source, face index) pairs a single-face image is cut from.
FACE_CUTS: tuple[tuple[str, int], ...] = (
    *(("t1", i) for i in range(len(T1_FACES))),
    ("tom_hanks", 0),
    ("astronaut", 0),
    ("camera", 0),
)
NOFACE_SOURCES: tuple[str, ...] = (
    "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "motorcycle", "hubble",
    "mask_black", "mask_blue", "mask_green", "mask_white",
)
#: Backgrounds behind a pasted face: photos without faces or animals in them.
BACKGROUNDS: tuple[str, ...] = ("coffee", "rocket", "brick", "grass", "gravel", "motorcycle", "hubble")

# Frame aspect ratios (width, height) and how often each is used.
ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 5), (3, 4), (4, 3), (16, 9))
ASPECT_P: tuple[float, ...] = (0.35, 0.25, 0.15, 0.15, 0.10)
SIDE_RANGE = (256, 640)  # long side of the content, pixels (small keeps detection and training fast)
FILTERS = ("normal", "washed_out", "bw")
FILTER_P = (0.60, 0.28, 0.12)


def source_path(name: str) -> Path:
    """The file of a source photo inside its installed package."""
    s = SOURCES[name]
    return Path(str(importlib.resources.files(s.package).joinpath(s.relpath)))


@functools.cache
def load_source(name: str) -> Image.Image:
    """The source photo as RGB (decoded once per process; callers must not modify it)."""
    with Image.open(source_path(name)) as im:
        return im.convert("RGB")


@functools.cache
def source_size(name: str) -> tuple[int, int]:
    with Image.open(source_path(name)) as im:
        return im.size


@functools.cache
def source_mean_rgb(name: str) -> tuple[float, float, float]:
    """Mean colour of a source photo (for the blurhash placeholder)."""
    small = load_source(name).resize((32, 32), Image.Resampling.BILINEAR)
    return tuple(float(v) for v in np.asarray(small, dtype=np.float32).reshape(-1, 3).mean(0))  # type: ignore[return-value]


# --------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class ImageFactors:
    """The visual factors that drive an image's hidden quality (effects: ``likes.py``)."""

    kind: str  # face | group | noface
    face_share: float  # face-box height / frame height (largest face); 0 without a face
    brightness: float  # multiplier on pixel values; < 1 is darker
    saturation: float  # 1 = unchanged, 0 = black and white
    filter: str  # normal | washed_out | bw
    border: bool  # white frame around the photo


def draw_factors(rng: np.random.Generator, kind: str) -> ImageFactors:
    """Draw the factors of one image of the given kind."""
    # Face height as a share of the frame: log-uniform 0.12..0.80, so 1/3 (the best) is central.
    face_share = float(np.exp(rng.uniform(np.log(0.12), np.log(0.80)))) if kind == "face" else 0.0
    # Brightness: mostly near 1, a fat dark tail (log-normal, clipped to 0.3..1.3).
    brightness = float(np.clip(np.exp(rng.normal(-0.08, 0.25)), 0.3, 1.3))
    filt = str(rng.choice(FILTERS, p=FILTER_P))
    if filt == "normal":
        saturation = float(rng.uniform(0.85, 1.25))
    elif filt == "washed_out":
        saturation = float(rng.uniform(0.25, 0.65))
    else:
        saturation = 0.0
    border = bool(rng.random() < 0.15)
    return ImageFactors(kind, face_share, brightness, saturation, filt, border)


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to render one image, and where its faces are (the composition record)."""

    factors: ImageFactors
    source: str  # the photo the faces (or the whole scene) come from
    face_index: int  # which face of ``source`` (kind 'face'), else -1
    window: Box  # crop of ``source`` (whole scene) or the face patch (kind 'face'), source pixels
    content_size: tuple[int, int]  # width, height before the border
    background: str  # kind 'face': the background photo, else ''
    bg_window: Box  # crop of the background photo
    bg_blur: float  # Gaussian blur radius of the background, pixels
    paste_xy: tuple[int, int]  # top-left of the scaled patch on the content, pixels
    patch_size: tuple[int, int]  # scaled patch width, height, pixels
    flip: bool
    gains: tuple[float, float, float]  # white-balance jitter per channel
    contrast: float
    border_px: int
    format: str  # JPEG | PNG
    jpeg_quality: int
    faces: tuple[Box, ...]  # face boxes in the final image, pixels
    width: int  # final size, border included
    height: int

    @property
    def n_faces(self) -> int:
        return len(self.faces)

    @property
    def has_face(self) -> bool:
        return bool(self.faces)

    @property
    def largest_face_area_share(self) -> float:
        """Largest face-box area / image area (what the face detector's table reports)."""
        if not self.faces:
            return 0.0
        return max((b[2] - b[0]) * (b[3] - b[1]) for b in self.faces) / (self.width * self.height)

    @property
    def mime(self) -> str:
        return "image/png" if self.format == "PNG" else "image/jpeg"

    @property
    def ext(self) -> str:
        return "png" if self.format == "PNG" else "jpg"


def _frame(rng: np.random.Generator) -> tuple[int, int]:
    aw, ah = ASPECTS[int(rng.choice(len(ASPECTS), p=ASPECT_P))]
    if rng.random() < 0.5 and aw != ah and (aw, ah) != (16, 9):
        aw, ah = ah, aw  # portrait and landscape equally, except 16:9 (landscape video-like stills)
    long_side = int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1))
    if aw >= ah:
        return long_side, max(64, round(long_side * ah / aw))
    return max(64, round(long_side * aw / ah)), long_side


def _window(rng: np.random.Generator, src_w: int, src_h: int, aspect: float, scale: tuple[float, float]) -> Box:
    """A random crop of the source with the frame's aspect, ``scale`` of the largest that fits."""
    if src_w / src_h >= aspect:
        wh = float(src_h)
        ww = wh * aspect
    else:
        ww = float(src_w)
        wh = ww / aspect
    f = rng.uniform(*scale)
    ww, wh = ww * f, wh * f
    x0 = rng.uniform(0, src_w - ww)
    y0 = rng.uniform(0, src_h - wh)
    return (float(x0), float(y0), float(x0 + ww), float(y0 + wh))


def _inside_share(face: Box, win: Box) -> float:
    ix = max(0.0, min(face[2], win[2]) - max(face[0], win[0]))
    iy = max(0.0, min(face[3], win[3]) - max(face[1], win[1]))
    return ix * iy / ((face[2] - face[0]) * (face[3] - face[1]))


def plan_image(rng: np.random.Generator, factors: ImageFactors, *, png_share: float = 0.15) -> ImagePlan:
    """Draw every rendering parameter of one image and compute where its faces land."""
    cw, ch = _frame(rng)
    aspect = cw / ch
    source, face_index, background, bg_window, bg_blur = "", -1, "", (0.0, 0.0, 0.0, 0.0), 0.0
    paste_xy, patch_size = (0, 0), (0, 0)
    faces: list[Box] = []

    if factors.kind == "face":
        source, face_index = FACE_CUTS[int(rng.integers(len(FACE_CUTS)))]
        sw, sh = source_size(source)
        fx1, fy1, fx2, fy2 = SOURCES[source].faces[face_index]
        fw, fh = fx2 - fx1, fy2 - fy1
        # Patch = face box plus hair above and shoulders below, clipped to the photo.
        window = (max(0.0, fx1 - 0.45 * fw), max(0.0, fy1 - 0.35 * fh),
                  min(float(sw), fx2 + 0.45 * fw), min(float(sh), fy2 + 0.6 * fh))
        k = factors.face_share * ch / fh  # scale making the face box face_share of the height
        face_w, face_h = fw * k, fh * k
        # Face centre near the middle, a bit above; the whole face box stays in the frame.
        cx = float(np.clip(cw * (0.5 + rng.normal(0, 0.1)), face_w / 2 + 1, cw - face_w / 2 - 1))
        cy = float(np.clip(ch * (0.45 + rng.normal(0, 0.08)), face_h / 2 + 1, ch - face_h / 2 - 1))
        bx1, by1 = cx - face_w / 2, cy - face_h / 2
        px, py = round(bx1 - (fx1 - window[0]) * k), round(by1 - (fy1 - window[1]) * k)
        paste_xy = (px, py)
        patch_size = (max(1, round((window[2] - window[0]) * k)), max(1, round((window[3] - window[1]) * k)))
        faces.append((bx1, by1, bx1 + face_w, by1 + face_h))
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        bw_, bh_ = source_size(background)
        bg_window = _window(rng, bw_, bh_, aspect, (0.5, 1.0))
        bg_blur = float(rng.uniform(2.0, 6.0))
    elif factors.kind == "group":
        source = "t1"
        sw, sh = source_size(source)
        window = (0.0, 0.0, float(sw), float(sh))
        for _ in range(50):  # keep at least three whole faces in the crop
            cand = _window(rng, sw, sh, aspect, (0.6, 1.0))
            if sum(_inside_share(f, cand) >= 0.999 for f in T1_FACES) >= 3:
                window = cand
                break
        else:
            window = _window(rng, sw, sh, aspect, (1.0, 1.0))
        k = cw / (window[2] - window[0])
        # A face counts when at least 60% of its box is in the crop; its box is clipped.
        for f in T1_FACES:
            if _inside_share(f, window) >= 0.6:
                x1, y1 = (max(f[0], window[0]) - window[0]) * k, (max(f[1], window[1]) - window[1]) * k
                x2, y2 = (min(f[2], window[2]) - window[0]) * k, (min(f[3], window[3]) - window[1]) * k
                faces.append((x1, y1, x2, y2))
    else:
        source = NOFACE_SOURCES[int(rng.integers(len(NOFACE_SOURCES)))]
        sw, sh = source_size(source)
        window = _window(rng, sw, sh, aspect, (0.6, 1.0))

    flip = bool(rng.random() < 0.5)
    gains = tuple(float(g) for g in rng.uniform(0.93, 1.07, size=3))
    contrast = float(rng.uniform(0.85, 1.15))
    border_px = round(rng.uniform(0.03, 0.07) * min(cw, ch)) if factors.border else 0
    fmt = "PNG" if rng.random() < png_share else "JPEG"
    jpeg_quality = int(rng.integers(78, 93))

    final: list[Box] = []
    for x1, y1, x2, y2 in faces:
        if flip:
            x1, x2 = cw - x2, cw - x1
        final.append((round(x1 + border_px, 2), round(y1 + border_px, 2),
                      round(x2 + border_px, 2), round(y2 + border_px, 2)))
    share = factors.face_share
    if factors.kind == "group":
        share = max(b[3] - b[1] for b in final) / ch if final else 0.0
        factors = ImageFactors(factors.kind, share, factors.brightness, factors.saturation,
                               factors.filter, factors.border)
    return ImagePlan(
        factors=factors, source=source, face_index=face_index, window=window, content_size=(cw, ch),
        background=background, bg_window=bg_window, bg_blur=bg_blur, paste_xy=paste_xy,
        patch_size=patch_size, flip=flip, gains=gains, contrast=contrast,  # type: ignore[arg-type]
        border_px=border_px, format=fmt, jpeg_quality=jpeg_quality, faces=tuple(final),
        width=cw + 2 * border_px, height=ch + 2 * border_px,
    )


# --------------------------------------------------------------------------- rendering


def _feather_mask(w: int, h: int, frac: float = 0.12) -> Image.Image:
    """Alpha mask fading linearly to 0 over ``frac`` of the shorter side at each edge."""
    ramp = max(1.0, frac * min(w, h))
    x = np.minimum(np.arange(w), np.arange(w)[::-1]) / ramp
    y = np.minimum(np.arange(h), np.arange(h)[::-1]) / ramp
    a = np.minimum.outer(np.clip(y, 0, 1), np.clip(x, 0, 1))
    return Image.fromarray((a * 255).astype(np.uint8), "L")


def _scene(plan: ImagePlan) -> Image.Image:
    cw, ch = plan.content_size
    lanczos = Image.Resampling.LANCZOS
    if plan.factors.kind == "face":
        bg = load_source(plan.background).resize((cw, ch), lanczos, box=plan.bg_window)
        bg = bg.filter(ImageFilter.GaussianBlur(plan.bg_blur))
        patch = load_source(plan.source).resize(plan.patch_size, lanczos, box=plan.window)
        bg.paste(patch, plan.paste_xy, _feather_mask(*plan.patch_size))
        return bg
    return load_source(plan.source).resize((cw, ch), lanczos, box=plan.window)


def render_pixels(plan: ImagePlan) -> Image.Image:
    """The plan's final RGB image (before encoding)."""
    img = _scene(plan)
    if plan.flip:
        img = ImageOps.mirror(img)
    f = plan.factors
    a = np.asarray(img, dtype=np.float32) * np.asarray(plan.gains, dtype=np.float32)
    mean = float(a.mean())
    a = mean + plan.contrast * (a - mean)
    gray = a @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    a = gray[..., None] + f.saturation * (a - gray[..., None])
    if f.filter == "washed_out":
        a = a * 0.80 + 40.0  # lifted blacks, lower contrast: the faded "filter" look
    a = a * f.brightness
    img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")
    if plan.border_px:
        img = ImageOps.expand(img, border=plan.border_px, fill=(255, 255, 255))
    return img


def encode(img: Image.Image, fmt: str, jpeg_quality: int = 85) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def render_image(plan: ImagePlan) -> bytes:
    """The encoded image file of a plan; the same plan always gives the same bytes."""
    return encode(render_pixels(plan), plan.format, plan.jpeg_quality)


PREVIEW_SIDE = 400  # Mastodon's "small" version is at most ~640 px; 400 keeps previews light


def render_preview(plan: ImagePlan) -> bytes:
    """The attachment's ``preview_url`` image: a JPEG at most PREVIEW_SIDE px on its long side."""
    img = render_pixels(plan)
    img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return encode(img, "JPEG", 80)


def preview_size(plan: ImagePlan) -> tuple[int, int]:
    s = min(1.0, PREVIEW_SIDE / max(plan.width, plan.height))
    return max(1, round(plan.width * s)), max(1, round(plan.height * s))


# --------------------------------------------------------------------------- blurhash

_B83 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~"


def _b83(value: int, length: int) -> str:
    return "".join(_B83[(value // 83 ** (length - 1 - i)) % 83] for i in range(length))


def blurhash_dc(rgb: tuple[float, float, float]) -> str:
    """A valid 1x1-component BlurHash (just the average colour), computed without rendering."""
    r, g, b = (int(np.clip(round(c), 0, 255)) for c in rgb)
    return _b83(0, 1) + _b83(0, 1) + _b83((r << 16) + (g << 8) + b, 4)


def plan_mean_rgb(plan: ImagePlan) -> tuple[float, float, float]:
    """Approximate mean colour of a plan's image (its main source, filtered and brightened)."""
    base = source_mean_rgb(plan.background or plan.source)
    gray = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
    rgb = [gray + plan.factors.saturation * (c - gray) for c in base]
    if plan.factors.filter == "washed_out":
        rgb = [c * 0.8 + 40 for c in rgb]
    return tuple(min(255.0, c * plan.factors.brightness) for c in rgb)  # type: ignore[return-value]
