"""Build MiniVTAB: eight offline tasks in the exact VTAB-1k NOAH layout, grouped like VTAB.

    python datasets/minivtab.py --out work_dirs/data/minivtab          # all tasks, seed 0 (about 20 s)
    python datasets/vtab1k.py verify --root work_dirs/data/minivtab --suite minivtab

Nothing is downloaded. Each task has ``train800`` / ``val200`` / ``train800val200`` (1,000 copies) / ``test`` (500)
JPEG images with ``.txt`` lists, class-balanced, written by :func:`vpeft.data.vtab.write_task` (the same writer the
VTAB-1k preparation uses). The class counts and groups are ``vpeft.data.vtab.MINIVTAB``:

=================  ===========  =======  ===================================================================
task               group        classes  images
=================  ===========  =======  ===================================================================
mini_fashion       natural      10       Fashion-MNIST t10k images (the mini backbone was pretrained on the
                                         60k training file only), 28x28
mini_digits        natural      10       scikit-learn's digits, 8x8 (the loader resizes, as VTAB's does)
mini_lesion        specialized  2        MONAI ``create_test_image_2d`` tissue; positives hold one bright lesion
mini_grade         specialized  5        MONAI tissue with 0-4 small lesions (the grade), like retinopathy grades
mini_count         structured   8        1-8 non-overlapping shapes (CLEVR count)
mini_location      structured   8        one sprite, label = x-position bin (dSprites location)
mini_orientation   structured   8        one arrow, label = 45-degree rotation bin (dSprites orientation)
mini_distance      structured   6        2-4 objects on a ground plane, label = distance bin of the closest
                                         (CLEVR distance / KITTI distance), bins equal in disparity
=================  ===========  =======  ===================================================================

Every task draws from ``numpy.random.RandomState(seed * 1000 + task index)``: the same seed gives the same images.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vpeft.data.common import FASHION_MNIST_ROOT, balanced_subset, check_root, gray_to_rgb  # noqa: E402
from vpeft.data.fashion_mnist import read_idx  # noqa: E402
from vpeft.data.vtab import MINIVTAB, write_task  # noqa: E402
from vpeft.engine import cli  # noqa: E402

SIZE = 32  # canvas of the procedural and MONAI tasks
Item = tuple[Image.Image, int]


def _balanced_labels(count: int, classes: int, rs: np.random.RandomState) -> np.ndarray:
    return rs.permutation(np.arange(count) % classes)


def _split_sizes(task: str) -> dict[str, int]:
    sizes = MINIVTAB[task].sizes
    return {s: sizes[s] for s in ("train800", "val200", "test")}


# ----------------------------------------------------------------------------------------------- natural: arrays


def _from_arrays(images: np.ndarray, labels: np.ndarray, task: str, seed: int, sizes=None) -> dict[str, list[Item]]:
    """Disjoint class-balanced ``test``, ``train800``, ``val200`` subsets of an image array (test drawn first)."""
    classes, left, out = MINIVTAB[task].num_classes, np.arange(len(labels)), {}
    sizes = sizes or _split_sizes(task)
    for offset, split in enumerate(("test", "train800", "val200")):
        pick = left[balanced_subset(labels[left], sizes[split], classes, seed=seed * 1000 + offset)]
        out[split] = [(gray_to_rgb(images[i]), int(labels[i])) for i in pick]
        left = np.setdiff1d(left, pick)
    return out


def fashion(seed: int, root: str | Path = FASHION_MNIST_ROOT, sizes=None) -> dict[str, list[Item]]:
    root = check_root("fashion_mnist", root, "t10k-images-idx3-ubyte.gz")
    images = read_idx(root / "t10k-images-idx3-ubyte.gz", 2051)
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz", 2049).astype(np.int64)
    return _from_arrays(images, labels, "mini_fashion", seed, sizes)


def digits(seed: int, sizes=None) -> dict[str, list[Item]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    return _from_arrays(images, data.target.astype(np.int64), "mini_digits", seed, sizes)


# ------------------------------------------------------------------------------------------ specialized: MONAI


def _tissue(rs: np.random.RandomState) -> np.ndarray:
    """Background tissue: MONAI's noisy circles of 3 intensity classes, scaled to at most 0.55."""
    from monai.data.synthetic import create_test_image_2d

    image, _ = create_test_image_2d(
        SIZE, SIZE, num_objs=rs.randint(2, 6), rad_max=11, rad_min=4, noise_max=0.2, num_seg_classes=3, random_state=rs
    )
    return 0.55 * image


def _lesions(count: int, rad_max: int, rs: np.random.RandomState) -> np.ndarray:
    """A mask of ``count`` small circles (MONAI's circle placement; a zero count gives an empty mask)."""
    from monai.data.synthetic import create_test_image_2d

    _, seg = create_test_image_2d(
        SIZE, SIZE, num_objs=count, rad_max=rad_max, rad_min=1, num_seg_classes=1, random_state=rs
    )
    return seg > 0


def _scan(image: np.ndarray, lesions: np.ndarray) -> Image.Image:
    """Tissue in [0, 0.55] -> a grey-pink RGB scan (every channel at most 0.55); lesion pixels are white.

    Lesions differ in brightness, not only in hue: the mini backbone was pretrained on grey images.
    """
    rgb = np.stack([image, 0.8 * image + 0.1, 0.9 * image + 0.05], axis=-1)
    rgb[lesions] = 1.0
    return Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8))


def lesion(label: int, rs: np.random.RandomState) -> Image.Image:
    """Tissue, with one lesion of radius 1-4 when ``label`` is 1 (a tumour patch, as in Patch Camelyon)."""
    image = _tissue(rs)
    return _scan(image, _lesions(label, 5, rs))


def grade(label: int, rs: np.random.RandomState) -> Image.Image:
    """Tissue with ``label`` lesions of radius 1-2 (lesion counts grade diabetic retinopathy)."""
    image = _tissue(rs)
    return _scan(image, _lesions(label, 3, rs))


# --------------------------------------------------------------------------------------- structured: procedural


def _color(rs: np.random.RandomState) -> tuple[int, int, int]:
    return tuple(int(c) for c in rs.randint(90, 256, size=3))


def _shape(draw: ImageDraw.ImageDraw, kind: int, x: float, y: float, r: float, fill) -> None:
    box = (x - r, y - r, x + r, y + r)
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def _mask(kind: int, x: float, y: float, r: float) -> np.ndarray:
    canvas = Image.new("L", (SIZE, SIZE))
    _shape(ImageDraw.Draw(canvas), kind, x, y, r, 255)
    return np.asarray(canvas) > 0


def count(label: int, rs: np.random.RandomState) -> Image.Image:
    """``label + 1`` shapes of radius 1.5-3 on a dark grey floor, no two sharing or touching a pixel.

    Each shape is rasterised first and kept only if its pixels, grown by one, miss every earlier shape's.
    """
    placed: list[tuple[int, float, float, float]] = []
    ink = np.zeros((SIZE, SIZE), dtype=bool)
    while len(placed) < label + 1:
        for _ in range(200):
            r = rs.uniform(1.5, 3.0)
            shape = (rs.randint(3), *rs.uniform(r + 1, SIZE - r - 1, size=2), r)
            mask = _mask(*shape)
            if not (ndimage.binary_dilation(mask) & ink).any():
                placed.append(shape)
                ink |= mask
                break
        else:  # crowded: start the layout again
            placed, ink = [], np.zeros_like(ink)
    image = Image.new("RGB", (SIZE, SIZE), (40, 40, 48))
    draw = ImageDraw.Draw(image)
    for kind, x, y, r in placed:
        _shape(draw, kind, x, y, r, _color(rs))
    return image


def location(label: int, rs: np.random.RandomState) -> Image.Image:
    """One white sprite on black whose centre x lies in bin ``label`` of 8 equal bins of [4, 28)."""
    image = Image.new("RGB", (SIZE, SIZE))
    r = rs.uniform(2.0, 4.0)
    x = 4 + 3 * (label + rs.uniform(0, 1))
    _shape(ImageDraw.Draw(image), rs.randint(3), x, rs.uniform(5, SIZE - 5), r, (255, 255, 255))
    return image


def orientation(label: int, rs: np.random.RandomState) -> Image.Image:
    """An arrow (tip plus tail, so 360 degrees are distinguishable) rotated into bin ``label`` of 45 degrees."""
    image = Image.new("RGB", (SIZE, SIZE))
    angle = math.radians(45 * (label + rs.uniform(0, 1)))
    scale, cx, cy = rs.uniform(7, 10), *rs.uniform(13, 19, size=2)
    outline = [(1.0, 0.0), (-0.2, 0.55), (-0.2, 0.2), (-0.9, 0.2), (-0.9, -0.2), (-0.2, -0.2), (-0.2, -0.55)]
    cos, sin = math.cos(angle), math.sin(angle)
    points = [(cx + scale * (u * cos - v * sin), cy - scale * (u * sin + v * cos)) for u, v in outline]
    ImageDraw.Draw(image).polygon(points, fill=(255, 255, 255))
    return image


HORIZON, FOCAL, NEAR_ROWS = 4, 27.0, (9.0, 31.0)  # the distance scene's camera


def distance(label: int, rs: np.random.RandomState) -> Image.Image:
    """2-4 objects on a ground plane; label = distance bin of the closest one (bin 0 = nearest).

    Pinhole projection: an object at depth ``z`` stands on the ground at row ``HORIZON + FOCAL / z`` with half-size
    ``6 / z`` pixels, so nearer objects are lower and larger (how CLEVR and KITTI encode distance). The six bins are
    equal in disparity ``1 / z`` (equal in image rows, like KITTI's uneven distance bins), ``z`` from 1 to 5.4.
    """
    image = Image.new("RGB", (SIZE, SIZE), (120, 150, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, HORIZON, SIZE, SIZE), fill=(70, 90, 60))
    low, high = NEAR_ROWS
    row = high - (label + rs.uniform(0, 1)) * (high - low) / 6
    nearest = FOCAL / (row - HORIZON)
    depths = [nearest, *rs.uniform(nearest, 9.0, size=rs.randint(1, 4))]
    for z in sorted(depths, reverse=True):  # far to near, so near objects cover far ones
        r, ground = 6.0 / z, HORIZON + FOCAL / z
        _shape(draw, rs.randint(2), rs.uniform(r + 1, SIZE - r - 1), ground - r, r, _color(rs))
    return image


PROCEDURAL: dict[str, Callable[[int, np.random.RandomState], Image.Image]] = {
    "mini_lesion": lesion,
    "mini_grade": grade,
    "mini_count": count,
    "mini_location": location,
    "mini_orientation": orientation,
    "mini_distance": distance,
}


def generate(task: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Item]]:
    """The ``train800``, ``val200`` and ``test`` items of one MiniVTAB task (``sizes``: other counts, for tests)."""
    if task == "mini_fashion":
        return fashion(seed, sizes=sizes)
    if task == "mini_digits":
        return digits(seed, sizes=sizes)
    draw = PROCEDURAL[task]
    rs = np.random.RandomState(seed * 1000 + list(MINIVTAB).index(task))
    out = {}
    for split, size in (sizes or _split_sizes(task)).items():
        labels = _balanced_labels(size, MINIVTAB[task].num_classes, rs)
        out[split] = [(draw(int(label), rs), int(label)) for label in labels]
    return out


def build(out: str | Path, tasks: list[str] | None = None, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write the tasks (default all) under ``out``; an existing task folder is kept unless ``overwrite``."""
    written = []
    for task in tasks or list(MINIVTAB):
        folder = Path(out) / task
        if folder.exists() and not overwrite:
            continue
        written.append(write_task(folder, generate(task, seed), overwrite=overwrite))
        print(f"minivtab: wrote {folder}", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "work_dirs" / "data" / "minivtab")
    parser.add_argument("--tasks", default="all", help="comma-separated MiniVTAB task names, or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild task folders that exist")
    args = parser.parse_args(argv)
    tasks = list(MINIVTAB) if args.tasks == "all" else args.tasks.split(",")
    unknown = [t for t in tasks if t not in MINIVTAB]
    if unknown:
        parser.error(f"unknown MiniVTAB tasks {unknown}; known: {', '.join(MINIVTAB)}")
    build(args.out, tasks, args.seed, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
