"""The embedded default data: a generated multi-spectral person ReID set.

Like RGBNT201: disjoint train / test identities (171 / 30 by default), 4 cameras, every image
seen in three aligned modalities - RGB (3 channels), NIR (1) and TIR (1).

An identity has a stable appearance: body height and build, skin and hair tone, upper and lower
garment colours, a garment pattern (solid, horizontal/vertical stripes, two-tone, chest logo)
with a second colour, shoes, maybe a bag; in NIR each garment has its own reflectance (not a
function of its colour, so NIR adds information), in TIR each part has its own temperature
(skin warm, clothing by insulation, a bag cold). A camera adds a colour cast, a brightness, a
background style, a viewpoint scale and its own thermal offset. Per image vary the horizontal
position, scale, stride of the legs, arm swing, facing (mirror), illumination, sensor noise,
a cluttered background and, often, an occluding object in front of the person. The person fills
a minority of the frame, so an untrained network's pooled features are dominated by clutter:
an untrained model scores low and training has something to learn.

Everything is drawn from ``numpy.random.default_rng((seed, kind, ids...))``: the same seed gives
the same bytes, in any order of generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A shared palette makes identities collide on single attributes: only combinations identify.
PALETTE = np.array([
    [0.85, 0.10, 0.10], [0.10, 0.25, 0.75], [0.10, 0.55, 0.20], [0.90, 0.80, 0.15],
    [0.95, 0.95, 0.95], [0.12, 0.12, 0.12], [0.55, 0.55, 0.58], [0.50, 0.30, 0.15],
    [0.55, 0.15, 0.60], [0.95, 0.50, 0.10], [0.40, 0.70, 0.90], [0.90, 0.60, 0.70],
], dtype=np.float32)
SKIN = np.array([[0.95, 0.80, 0.68], [0.85, 0.65, 0.50], [0.62, 0.45, 0.32], [0.40, 0.28, 0.20]], dtype=np.float32)
PATTERNS = ("solid", "hstripes", "vstripes", "twotone", "logo")


@dataclass(frozen=True)
class Identity:
    height: float  # fraction of the frame height
    build: float  # width factor
    skin: np.ndarray  # [3]
    hair: float  # grey level of hair
    upper: np.ndarray  # [3]
    upper2: np.ndarray  # [3] second colour of the pattern
    lower: np.ndarray  # [3]
    shoes: np.ndarray  # [3]
    pattern: str
    stripe_period: int
    bag: int  # 0 none, 1 left, 2 right
    bag_color: np.ndarray
    nir: np.ndarray  # [5] reflectance: upper, upper2, lower, shoes, bag
    tir: np.ndarray  # [5] temperature: skin, upper, lower, shoes, bag


@dataclass(frozen=True)
class Camera:
    cast: np.ndarray  # [3] per-channel gain
    brightness: float
    bg_color: np.ndarray  # [3]
    bg_nir: float
    bg_tir: float
    scale: float
    tir_offset: float


def make_identity(seed: int, pid: int) -> Identity:
    r = np.random.default_rng((seed, 1, pid))
    pick = lambda: PALETTE[r.integers(len(PALETTE))] * r.uniform(0.85, 1.1, 3).astype(np.float32)  # noqa: E731
    return Identity(
        height=float(r.uniform(0.62, 0.8)), build=float(r.uniform(0.8, 1.25)),
        skin=SKIN[r.integers(len(SKIN))], hair=float(r.uniform(0.05, 0.6)),
        upper=pick(), upper2=pick(), lower=pick(), shoes=pick(),
        pattern=PATTERNS[r.integers(len(PATTERNS))], stripe_period=int(r.integers(3, 7)),
        bag=int(r.choice(3, p=[0.5, 0.25, 0.25])), bag_color=pick(),
        nir=r.uniform(0.1, 0.95, 5).astype(np.float32),
        tir=np.concatenate([[r.uniform(0.8, 0.95)], r.uniform(0.35, 0.75, 3), [r.uniform(0.1, 0.3)]]).astype(np.float32),
    )


def make_camera(seed: int, cam: int) -> Camera:
    r = np.random.default_rng((seed, 2, cam))
    return Camera(
        cast=r.uniform(0.75, 1.25, 3).astype(np.float32), brightness=float(r.uniform(0.7, 1.2)),
        bg_color=r.uniform(0.2, 0.8, 3).astype(np.float32), bg_nir=float(r.uniform(0.2, 0.7)),
        bg_tir=float(r.uniform(0.1, 0.4)), scale=float(r.uniform(0.85, 1.1)),
        tir_offset=float(r.uniform(-0.08, 0.08)),
    )


def _background(r: np.random.Generator, cam: Camera, h: int, w: int):
    """Cluttered scene: smooth gradients plus random coloured blocks, in all three modalities."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.empty((3, h, w), np.float32)
    base = cam.bg_color * r.uniform(0.7, 1.3, 3)
    for c in range(3):
        fy, fx, ph = r.uniform(0.02, 0.15), r.uniform(0.02, 0.2), r.uniform(0, 6.3)
        rgb[c] = base[c] + 0.15 * np.sin(fy * yy + fx * xx + ph)
    nir = cam.bg_nir + 0.1 * np.sin(r.uniform(0.02, 0.1) * yy + r.uniform(0, 6.3)) * np.ones_like(xx)
    tir = cam.bg_tir + 0.05 * (yy / h)
    for _ in range(int(r.integers(3, 9))):
        y0, x0 = int(r.integers(0, h)), int(r.integers(0, w))
        bh, bw = int(r.integers(h // 10, h // 2)), int(r.integers(w // 8, w // 2))
        rgb[:, y0:y0 + bh, x0:x0 + bw] = PALETTE[r.integers(len(PALETTE))][:, None, None] * r.uniform(0.6, 1.1)
        nir[y0:y0 + bh, x0:x0 + bw] = r.uniform(0.1, 0.9)
        tir[y0:y0 + bh, x0:x0 + bw] = r.uniform(0.05, 0.6)  # warm machines, cold walls
    return rgb, nir, tir


@dataclass(frozen=True)
class _Pose:
    """Where the person stands in one image (pixels): ``ph`` person height, ``cx`` centre column,
    ``top`` head row, ``half`` half the torso width, ``stride`` / ``swing`` leg and arm offsets."""

    ph: float
    cx: float
    top: float
    half: float
    stride: float
    swing: float


def _draw_pose(ident: Identity, cam: Camera, r: np.random.Generator, h: int, w: int) -> _Pose:
    ph = ident.height * cam.scale * r.uniform(0.9, 1.05) * h
    cx = w / 2 + r.uniform(-0.15, 0.15) * w
    top = (h - ph) * r.uniform(0.2, 0.8)
    half = 0.14 * ph * ident.build * 0.5 * 2.2 / 2
    return _Pose(ph, cx, top, half, stride=r.uniform(0.0, 0.06) * ph, swing=r.uniform(-0.04, 0.04) * ph)


def _second_colour(ident: Identity, yy, xx, pose: _Pose, torso, band):
    """The upper garment pattern: where its second colour shows."""
    if ident.pattern == "hstripes":
        return ((yy - pose.top) // ident.stripe_period) % 2 == 1
    if ident.pattern == "vstripes":
        return ((xx - pose.cx + 100) // ident.stripe_period) % 2 == 1
    if ident.pattern == "twotone":
        return xx >= pose.cx
    if ident.pattern == "logo":
        return (np.abs(xx - pose.cx) <= 0.3 * pose.half) & band(0.22, 0.32)
    return np.zeros_like(torso)


def _body_parts(ident: Identity, yy, xx, pose: _Pose) -> list:
    """(mask [h, w], rgb colour, NIR value, TIR value) of every part of the person, painted in order."""
    ph, cx, top, half = pose.ph, pose.cx, pose.top, pose.half

    def band(y0, y1):
        return (yy >= top + y0 * ph) & (yy < top + y1 * ph)

    head = ((yy - (top + 0.07 * ph)) / (0.07 * ph)) ** 2 + ((xx - cx) / (0.05 * ph)) ** 2 <= 1
    hair = head & (yy < top + 0.055 * ph)
    torso = band(0.14, 0.52) & (np.abs(xx - cx) <= half)
    arms = (band(0.15, 0.5) & (np.abs(np.abs(xx - cx) - half - 0.03 * ph) <= 0.025 * ph)
            & (yy < top + 0.5 * ph + pose.swing))
    legs_y = band(0.52, 0.93)
    leg_l = legs_y & (np.abs(xx - (cx - 0.045 * ph - pose.stride * (yy - top - 0.52 * ph) / ph)) <= 0.04 * ph)
    leg_r = legs_y & (np.abs(xx - (cx + 0.045 * ph + pose.stride * (yy - top - 0.52 * ph) / ph)) <= 0.04 * ph)
    shoes = band(0.93, 1.0) & (np.abs(xx - cx) <= 0.1 * ph)
    second = _second_colour(ident, yy, xx, pose, torso, band)
    parts = [
        (leg_l | leg_r, ident.lower, ident.nir[2], ident.tir[2]),
        (torso & ~second, ident.upper, ident.nir[0], ident.tir[1]),
        (torso & second, ident.upper2, ident.nir[1], ident.tir[1]),
        ((head & ~hair) | arms, ident.skin, 0.6, ident.tir[0]),
        (hair, np.full(3, ident.hair, np.float32), 0.3, 0.6),
        (shoes, ident.shoes, ident.nir[3], ident.tir[3]),
    ]
    if ident.bag:
        side = -1 if ident.bag == 1 else 1
        bag = band(0.35, 0.55) & (np.abs(xx - (cx + side * (half + 0.07 * ph))) <= 0.05 * ph)
        parts.append((bag, ident.bag_color, ident.nir[4], ident.tir[4]))
    return parts


def _occlude(rgb, nir, tir, r: np.random.Generator, yy, xx, pose: _Pose) -> None:
    """Sometimes an occluder in front: a pole from the side or an object from below (in place)."""
    if r.random() < 0.4:
        if r.random() < 0.5:
            x0 = int(pose.cx + r.uniform(-0.2, 0.2) * pose.ph)
            occ = (xx >= x0) & (xx < x0 + int(r.uniform(0.05, 0.12) * pose.ph))
        else:
            occ = yy >= pose.top + r.uniform(0.6, 0.85) * pose.ph
        rgb[:, occ] = PALETTE[r.integers(len(PALETTE))][:, None] * r.uniform(0.5, 1.0)
        nir[occ] = r.uniform(0.1, 0.9)
        tir[occ] = r.uniform(0.1, 0.5)


def _sense(rgb, nir, tir, cam: Camera, r: np.random.Generator, h: int, w: int):
    """What the cameras record: light and colour cast, low-resolution TIR, noise, maybe mirrored; uint8."""
    light = cam.brightness * r.uniform(0.7, 1.3)
    rgb = rgb * cam.cast[:, None, None] * light * r.uniform(0.9, 1.1, (3, 1, 1))
    nir = nir * r.uniform(0.75, 1.25)
    tir = tir + cam.tir_offset
    # TIR sensors are low resolution: 2x2 block blur
    tir = np.repeat(np.repeat(tir[0::2, 0::2], 2, 0), 2, 1)[:h, :w]
    rgb += r.normal(0, 0.04, rgb.shape)
    nir += r.normal(0, 0.05, nir.shape)
    tir += r.normal(0, 0.03, tir.shape)
    if r.random() < 0.5:  # facing the other way
        rgb, nir, tir = rgb[:, :, ::-1], nir[:, ::-1], tir[:, ::-1]
    to8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    return to8(rgb), to8(nir)[None], to8(tir)[None]


def render(ident: Identity, cam: Camera, r: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image of ``ident`` seen by ``cam``: uint8 RGB [3,h,w], NIR [1,h,w], TIR [1,h,w]."""
    rgb, nir, tir = _background(r, cam, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pose = _draw_pose(ident, cam, r, h, w)
    for mask, color, n, t in _body_parts(ident, yy, xx, pose):
        rgb[:, mask] = np.asarray(color, np.float32)[:, None]
        nir[mask] = n
        tir[mask] = t
    _occlude(rgb, nir, tir, r, yy, xx, pose)
    return _sense(rgb, nir, tir, cam, r, h, w)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Identities 0..num_train-1 train, the next num_test are test."""

    seed: int = 0
    num_train_ids: int = 171
    num_test_ids: int = 30
    num_cameras: int = 4
    images_per_camera: int = 4
    height: int = 128
    width: int = 64

    def __post_init__(self) -> None:
        for name in ("num_train_ids", "num_test_ids", "num_cameras", "images_per_camera"):
            if getattr(self, name) < 1:
                raise ValueError(f"synth.{name}={getattr(self, name)} must be >= 1")
        if self.num_cameras < 2:
            raise ValueError(f"synth.num_cameras={self.num_cameras} must be >= 2: "
                             "evaluation needs a gallery match from another camera")
        if self.images_per_camera < 2:
            raise ValueError(f"synth.images_per_camera={self.images_per_camera} must be >= 2: "
                             "one image per camera is the query, the others form the gallery")
        if self.height < 32 or self.width < 16:
            raise ValueError(f"synth image size {self.height}x{self.width} is too small (min 32x16)")


def records(spec: SynthSpec, split: str):
    """Yield the records of one split ("train", "query" or "gallery").

    Test identities: per camera, image 0 is a query and the rest are gallery, so every query
    has true matches under other cameras and same-camera matches the evaluation must exclude.
    """
    if split == "train":
        pids = range(spec.num_train_ids)
    else:
        pids = range(spec.num_train_ids, spec.num_train_ids + spec.num_test_ids)
    cams = [make_camera(spec.seed, c) for c in range(spec.num_cameras)]
    for pid in pids:
        ident = make_identity(spec.seed, pid)
        for c, cam in enumerate(cams):
            for i in range(spec.images_per_camera):
                if split == "query" and i != 0 or split == "gallery" and i == 0:
                    continue
                r = np.random.default_rng((spec.seed, 3, pid, c, i))
                rgb, nir, tir = render(ident, cam, r, spec.height, spec.width)
                yield {"rgb": rgb, "nir": nir, "tir": tir, "pid": pid, "camid": c,
                       "name": f"{pid:06d}_cam{c + 1}_{i:04d}"}


def num_records(spec: SynthSpec, split: str) -> int:
    per_id = {"train": spec.num_cameras * spec.images_per_camera,
              "query": spec.num_cameras,
              "gallery": spec.num_cameras * (spec.images_per_camera - 1)}[split]
    return per_id * (spec.num_train_ids if split == "train" else spec.num_test_ids)


def ensure_synth(out_dir: str, spec: SynthSpec, progress: bool = True, force: bool = False,
                 field: str = "data.path") -> bool:
    """Generate the set into ``out_dir`` unless it is already there for this exact spec (``force``:
    regardless). Returns True when it generated.

    A set of another spec is replaced; a folder msmoe did not make is refused (DataError naming
    ``field``). Processes making the same ``out_dir`` at once wait for one generation and share it.
    """
    from tqdm import tqdm

    from reid.data import spec_meta, write_dataset

    if not force and not synth_needs_writing(out_dir, spec, field):
        return False
    def maker(split):
        return lambda: tqdm(records(spec, split), total=num_records(spec, split), desc=f"synth {split}",
                            disable=not progress, leave=False)

    splits = {split: maker(split) for split in ("train", "query", "gallery")}
    return write_dataset(out_dir, splits, spec.height, spec.width, spec_meta("synth", spec), field=field,
                         reuse=not force)


def synth_needs_writing(out_dir: str, spec: SynthSpec, field: str = "data.path") -> bool:
    """Whether ``out_dir`` lacks this spec's set (read-only; the launching process asks it too).
    Garbage metadata, or a folder msmoe did not make where the set would go, raise DataError."""
    from reid.data import read_meta, spec_meta
    from reid.dataset_dir import check_replaceable

    if read_meta(out_dir) == spec_meta("synth", spec):
        return False
    check_replaceable(out_dir, field)
    return True
