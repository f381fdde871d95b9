"""COCO-format object detection data, and kdpipe's built-in detection set.

`CocoDetection` is the source `data.open_source` opens for `coco:ANNOTATIONS.json[?images=FOLDER]`:
the images a COCO annotation file lists, in ascending image id order, each with its boxes.
A detection target is a set of boxes, not one label per image, so the source's `labels`
are all UNLABELLED, `targets(index)` gives the boxes, and `task = "detection"` tells it
apart from a classification source. Everything an annotation can get wrong is checked
when the file is opened, so a bad box is one line naming it, not a crash mid-run.

`write_digit_scenes` writes the built-in detection set from scikit-learn's bundled data
alone (nothing to download): its 8x8 digits pasted onto crops of its two sample photos,
with a COCO annotation file for each of a train and a val split.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import UNLABELLED, absolute_path, fingerprint
from .errors import ConfigError, DataError
from .sources import Source, decode_image, parse_spec, read_image_file, with_query

# COCO's own boxes overshoot their image by fractions of a pixel; up to this much a box is
# clipped to the image, beyond it the box is an error.
BOX_TOLERANCE = 1.0
SECTIONS = ("images", "annotations", "categories")

# the built-in set: digits of 16-40 px, 1-3 to an image, on 80-128 px crops of a photo
DIGIT_SIDES = (16, 40)
DIGITS_PER_IMAGE = (1, 3)
PLACEMENT_TRIES = 10  # positions tried for a digit before it is left out, so digits never overlap
SCENE_SIDES = (80, 128)
JPEG_QUALITY = 90


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_annotation_file(path: Path) -> dict:
    """A COCO annotation file's JSON: an object holding the images, annotations and
    categories lists."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"annotation file {path} does not exist; check the path after coco:") from None
    except OSError as exc:
        raise DataError(f"cannot read annotation file {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError included
        raise DataError(f"annotation file {path} is not valid JSON ({exc}); fix or replace it") from None
    if not isinstance(document, dict):
        raise DataError(f"{path} is not a COCO annotation file: expected a JSON object with "
                        f"{', '.join(SECTIONS)} lists")
    for section in SECTIONS:
        if not isinstance(document.get(section), list):
            raise DataError(f'{path} has no "{section}" list; a COCO annotation file needs {", ".join(SECTIONS)}')
    return document


def clip_box(bbox: object, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    """A COCO bbox [x, y, w, h] as (x0, y0, x1, y1), clipped to the width x height image
    when it overshoots by at most BOX_TOLERANCE; `where` names the annotation in errors."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height] (four numbers); fix the annotation")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: bbox {bbox} has a width or height <= 0; give the box a positive size "
                        "or remove the annotation")
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise DataError(f"{where}: bbox {bbox} (x, y, width, height) reaches outside the {width}x{height} image; "
                        "fix the box or the image's width and height")
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: bbox {bbox} lies outside the {width}x{height} image; fix the box")
    return x0, y0, x1, y1


class CocoDetection(Source):
    """The images and boxes of a COCO annotation file: `coco:ANNOTATIONS.json[?images=FOLDER]`.
    An image's file_name is relative to FOLDER (default: the annotation file's folder) or
    absolute. Every image of the file is a sample, with or without annotations, in
    ascending image id order; `classes` are the category names in ascending id order."""

    task = "detection"

    def __init__(self, spec: str):
        path, options = parse_spec(spec.removeprefix("coco:"), ("images",))
        self.file = Path(absolute_path(path))
        self.options = {key: absolute_path(value) for key, value in options.items()}
        self.folder = Path(self.options.get("images", self.file.parent))
        document = read_annotation_file(self.file)
        names = self._categories(document["categories"])
        self.category_ids = sorted(names)
        self.classes = [names[category_id] for category_id in self.category_ids]
        images = self._images(document["images"])
        self.image_ids = [image["id"] for image in images]
        self.file_names = [image["file_name"] for image in images]
        self.paths = [self.folder / name for name in self.file_names]
        self.image_sizes = [(image["width"], image["height"]) for image in images]
        self.labels = np.full(len(images), UNLABELLED, dtype=np.int64)
        file_sizes = [self._file_size(index) for index in range(len(images))]
        annotations = self._annotations(document["annotations"])
        self.fingerprint = fingerprint({
            "categories": [[category_id, names[category_id]] for category_id in self.category_ids],
            "images": [[name, file_size, width, height, keys]
                       for name, file_size, (width, height), keys
                       in zip(self.file_names, file_sizes, self.image_sizes, annotations)],
        })

    def _categories(self, entries: list) -> dict[int, str]:
        """{category id: name}; ids and names each used once."""
        names: dict[int, str] = {}
        for position, entry in enumerate(entries):
            if not (isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("name"), str)
                    and entry["name"]):
                raise DataError(f"{self.file}: categories[{position}] needs an integer id and a non-empty name; "
                                "fix the category")
            category_id, name = entry["id"], entry["name"]
            if category_id in names:
                raise DataError(f"{self.file}: category id {category_id} is used twice ({names[category_id]!r} and "
                                f"{name!r}); give each category its own id")
            if name in names.values():
                raise DataError(f"{self.file}: category name {name!r} is used twice (ids "
                                f"{next(i for i, n in names.items() if n == name)} and {category_id}); "
                                "give each category its own name")
            names[category_id] = name
        if not names:
            raise DataError(f'{self.file} has no categories; list the object classes under "categories"')
        return names

    def _images(self, entries: list) -> list[dict]:
        """The image entries in ascending id order, each checked."""
        file_name_of: dict[int, str] = {}
        for position, entry in enumerate(entries):
            if not (isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("file_name"), str)
                    and entry["file_name"]):
                raise DataError(f"{self.file}: images[{position}] needs an integer id and a file_name; fix the entry")
            image_id, name = entry["id"], entry["file_name"]
            if image_id in file_name_of:
                raise DataError(f"{self.file}: image id {image_id} is used twice ({file_name_of[image_id]} and "
                                f"{name}); give each image its own id")
            width, height = entry.get("width"), entry.get("height")
            if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
                raise DataError(f"{self.file}: image {name} (id {image_id}) has width {width!r} and height "
                                f"{height!r}; both must be positive integers (its size in pixels)")
            file_name_of[image_id] = name
        if not file_name_of:
            raise DataError(f'{self.file} lists no images; add them under "images"')
        return sorted(entries, key=lambda entry: entry["id"])

    def _file_size(self, index: int) -> int:
        """The size in bytes of image `index`'s file, which must exist."""
        path, where = self.paths[index], f"{self.file}: image {self.file_names[index]} (id {self.image_ids[index]})"
        try:
            info = os.stat(path)
        except OSError as exc:
            raise DataError(f"{where}: cannot read {path}: {exc.strerror or exc}; fix its file_name, "
                            "or point ?images= at the images' folder") from None
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{where}: {path} is not a file; fix its file_name, "
                            "or point ?images= at the images' folder")
        return info.st_size

    def _annotations(self, entries: list) -> list[list]:
        """Check every annotation and keep each image's boxes, labels and crowd flags as
        numpy arrays (a contiguous run per image, so targets() is a slice and the source
        pickles quickly into loader workers); return each image's fingerprint keys
        [bbox, category_id, iscrowd], in file order."""
        position_of = {image_id: position for position, image_id in enumerate(self.image_ids)}
        label_of = {category_id: place + 1 for place, category_id in enumerate(self.category_ids)}  # 0: background
        keys: list[list] = [[] for _ in self.image_ids]
        seen: set[int] = set()
        owners, boxes, labels, crowd = [], [], [], []
        for position, entry in enumerate(entries):
            if not (isinstance(entry, dict) and _is_int(entry.get("id"))):
                raise DataError(f"{self.file}: annotations[{position}] needs an integer id; fix the entry")
            where = f"{self.file}: annotation {entry['id']}"
            if entry["id"] in seen:
                raise DataError(f"{where} is listed twice; give each annotation its own id")
            seen.add(entry["id"])
            image_id = entry.get("image_id")
            if not _is_int(image_id) or image_id not in position_of:
                raise DataError(f"{where}: image_id {image_id!r} is not an image of the file; "
                                "fix its image_id or add the image")
            owner = position_of[image_id]
            where += f" (image {self.file_names[owner]})"
            category_id = entry.get("category_id")
            if not _is_int(category_id) or category_id not in label_of:
                raise DataError(f"{where}: category_id {category_id!r} is not a category (the categories are "
                                f"{', '.join(map(str, self.category_ids))}); fix its category_id or add the category")
            iscrowd = entry.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise DataError(f"{where}: iscrowd {iscrowd!r} must be 0 or 1")
            boxes.append(clip_box(entry.get("bbox"), *self.image_sizes[owner], where))
            owners.append(owner)
            labels.append(label_of[category_id])
            crowd.append(bool(iscrowd))
            keys[owner].append([[float(v) for v in entry["bbox"]], category_id, int(iscrowd)])
        order = np.argsort(np.array(owners, dtype=np.int64), kind="stable")
        self._boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)[order]
        self._labels = np.array(labels, dtype=np.int64)[order]
        self._crowd = np.array(crowd, dtype=bool)[order]
        counts = np.bincount(np.array(owners, dtype=np.int64), minlength=len(self.image_ids))
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        return keys

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        return read_image_file(self.paths[index])

    def decode(self, data: bytes, index: int) -> torch.Tensor:
        image = decode_image(data, self.name(index))
        width, height = self.image_sizes[index]
        if image.shape[1:] != (height, width):
            raise DataError(f"image {self.name(index)} (id {self.image_ids[index]}) is {image.shape[2]}x"
                            f"{image.shape[1]} pixels, and {self.file} says {width}x{height}; "
                            "fix its width and height in the annotation file")
        return image

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def targets(self, index: int) -> dict[str, np.ndarray]:
        """Image `index`'s objects: "boxes" float32 (n, 4) as x0, y0, x1, y1 in the image's
        pixels, "labels" int64 (n,) as the category's place in `classes` + 1 (0 is the
        background, as torchvision's detection models expect), "crowd" bool (n,)."""
        start, stop = self._starts[index], self._starts[index + 1]
        return {"boxes": self._boxes[start:stop].copy(), "labels": self._labels[start:stop].copy(),
                "crowd": self._crowd[start:stop].copy()}

    def describe(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "num_samples": len(self),
            "classes": self.classes,
            "labelled": True,
            "location": with_query(f"coco:{self.file}", self.options),
            "task": self.task,
        }


# --- the built-in detection set --------------------------------------------------------


def _digit_scene(rng: np.random.Generator, photos: list[np.ndarray], glyphs: np.ndarray, digits: np.ndarray,
                 sides: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One scene: a crop of a photo, height and width drawn from `sides`, holding 1-3
    non-overlapping digits; its uint8 (H, W, 3) pixels and its (digit, [x, y, w, h]) objects."""
    height, width = (int(side) for side in rng.integers(sides[0], sides[1] + 1, size=2))
    photo = photos[rng.integers(len(photos))]
    top, left = rng.integers(photo.shape[0] - height + 1), rng.integers(photo.shape[1] - width + 1)
    canvas = photo[top:top + height, left:left + width].astype(np.float32)
    taken: list[tuple[int, int, int]] = []  # (y, x, side) of the squares holding a digit
    objects = []
    for _ in range(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1)):
        sample, side = rng.integers(len(glyphs)), int(rng.integers(DIGIT_SIDES[0], DIGIT_SIDES[1] + 1))
        for _ in range(PLACEMENT_TRIES):
            y, x = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
            if all(y + side <= ty or ty + ts <= y or x + side <= tx or tx + ts <= x for ty, tx, ts in taken):
                break
        else:
            continue
        pixel = np.arange(side) * glyphs.shape[1] // side  # nearest-neighbour scaling
        alpha = (glyphs[sample][np.ix_(pixel, pixel)] / 16.0)[..., None]  # glyph intensity 0..16
        patch = canvas[y:y + side, x:x + side]
        # a dark digit on a bright background, a bright one on a dark background
        colour = rng.integers(0, 56, size=3) if patch.mean() > 128 else rng.integers(200, 256, size=3)
        patch[:] = patch * (1 - alpha) + colour * alpha
        rows, cols = np.flatnonzero(alpha.any(axis=(1, 2))), np.flatnonzero(alpha.any(axis=(0, 2)))
        box = [x + int(cols[0]), y + int(rows[0]), int(cols[-1] - cols[0]) + 1, int(rows[-1] - rows[0]) + 1]
        taken.append((y, x, side))
        objects.append((int(digits[sample]), box))
    return np.rint(canvas).astype(np.uint8), objects


def write_digit_scenes(root: Path, num_train: int, num_val: int, size: tuple[int, int] = SCENE_SIDES,
                       seed: int = 0) -> dict[str, Path]:
    """Write the built-in detection set under `root`: JPEGs in images/ and COCO annotation
    files train.json and val.json (images 0..num_train-1, then num_val more), whose
    file_names are relative to `root`, so `coco:ROOT/train.json` opens it.

    Each image is a crop of scikit-learn's china.jpg or flower.jpg, its height and width
    each drawn from `size` (smallest, largest side in pixels), holding 1-3 of scikit-learn's
    8x8 digits scaled to 16-40 px, blended in a bright or dark colour by the glyph's
    intensity; a box is the pasted glyph's tight extent, and categories "0".."9" have ids
    1..10. Image k draws only from numpy's default_rng([seed, k]), so the files are the
    same, byte for byte, every run. Returns {"train": JSON, "val": JSON, "images": folder}."""
    if num_train < 1 or num_val < 1:
        raise ConfigError(f"the digit scenes need at least one train and one val image, got {num_train} and {num_val}")
    from sklearn.datasets import load_digits, load_sample_images

    photos = load_sample_images().images
    smallest_photo_side = min(min(photo.shape[:2]) for photo in photos)
    if not DIGIT_SIDES[1] <= size[0] <= size[1] <= smallest_photo_side:
        raise ConfigError(f"the digit scenes' sides must satisfy {DIGIT_SIDES[1]} <= SMALLEST <= LARGEST <= "
                          f"{smallest_photo_side}, got {tuple(size)}")
    digits = load_digits()
    images_folder = root / "images"
    images_folder.mkdir(parents=True, exist_ok=True)
    categories = [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(10)]
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    paths, annotation_id = {}, 0
    for split, numbers in splits.items():
        images, annotations = [], []
        for number in numbers:
            rng = np.random.default_rng([seed, number])
            pixels, objects = _digit_scene(rng, photos, digits.images, digits.target, size)
            file_name = f"images/{number:06d}.jpg"
            Image.fromarray(pixels).save(root / file_name, quality=JPEG_QUALITY)
            images.append({"id": number + 1, "file_name": file_name, "width": pixels.shape[1],
                           "height": pixels.shape[0]})
            for digit, box in objects:
                annotation_id += 1
                annotations.append({"id": annotation_id, "image_id": number + 1, "category_id": digit + 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        paths[split] = root / f"{split}.json"
        document = {"images": images, "annotations": annotations, "categories": categories}
        paths[split].write_text(json.dumps(document, indent=1) + "\n")
    return paths | {"images": images_folder}
