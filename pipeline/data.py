"""Data sources, their fingerprints, and the datasets that turn them into views.

A source is a list of images with optional labels (the `Source` interface, in
`pipeline/sources.py`): an image folder (one subfolder per class, or images directly
inside for unlabelled data), a seeded synthetic set, or one of the sources of
`pipeline/sources.py` (label files, WebDataset shards, Hugging Face datasets);
`open_source` opens any of them by its spec (`open_images`: every image below a folder,
whatever its layout, for a model to run on). Its fingerprint hashes the sorted sample
keys, file sizes and labels, so an archive can tell whether it is being replayed on the
data it was made from.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .coco import CocoDetection
from .config import UNLABELLED, ViewRecipe, absolute_path, fingerprint
from .distributed import Ranks
from .errors import DataError
from .progress import say
from .sources import ImageFiles, Source, describe_listed, is_image, open_listed
from .views import epoch_order, eval_view, mix, mix_view, partners, render, sample_view, view_param_fields

DIGEST_BYTES = 32  # sha256


def content_digest(data: bytes) -> np.ndarray:
    """The sha256 of a sample's bytes as DIGEST_BYTES uint8."""
    return np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)


def content_digests(source: Source, threads: int = 8) -> np.ndarray:
    """(N, 32) uint8: the sha256 of every sample's bytes, in index order (sha256 releases
    the GIL, so threads overlap reading and hashing)."""
    with ThreadPoolExecutor(threads, thread_name_prefix="kdpipe-hash") as pool:
        digests = list(pool.map(lambda index: content_digest(source.read(index)), range(len(source))))
    return np.stack(digests)


def _unreadable(path: str, exc: OSError) -> DataError:
    return DataError(f"cannot read {path}: {exc.strerror or exc}; fix its permissions or remove it from the data")


def _listing(folder: str | os.PathLike) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise _unreadable(os.fspath(folder), exc) from None


def _images_below(folder: str) -> Iterator[str]:
    """Every image file below `folder`, in name order; an unreadable subfolder is an error
    (skipping it would quietly train on part of a class)."""

    def fail(exc: OSError) -> None:
        raise _unreadable(exc.filename or folder, exc)

    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (os.path.join(dirpath, name) for name in sorted(filter(is_image, filenames)))


def _size(path: str) -> int:
    """A file's size in bytes; a dangling link or vanished file is an error naming it."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc} (a broken link?); fix or remove it") from None


class ImageFolder(ImageFiles):
    """Images under `root`: `root/CLASS/**/*.png` (labelled, classes sorted by name) or
    `root/*.png` (unlabelled). Any PIL-readable format and mode is converted to RGB."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.exists():
            raise DataError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {root} is not a folder of images")
        entries = sorted((e for e in _listing(root) if not e.name.startswith(".")), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir()]
        top_images = [e for e in entries if is_image(e.name) and not e.is_dir()]
        if class_dirs and top_images:
            raise DataError(
                f"{root} mixes images ({top_images[0].name}) with class folders; "
                "put every image in a class folder, or use a folder of images alone for unlabelled data"
            )
        keys: list[tuple[str, int, int]] = []  # (relative path, bytes, label)
        if class_dirs:
            classes = [e.name for e in class_dirs]
            for label, class_dir in enumerate(class_dirs):
                found = [(path, _size(path), label) for path in _images_below(class_dir.path)]
                if not found:
                    say(f"warning: class folder {class_dir.path} holds no images; it stays class {label} "
                        f"({class_dir.name}), which the student learns but never sees")
                keys.extend((os.path.relpath(path, root), size, label) for path, size, label in found)
        else:
            classes = None
            keys = [(e.name, _size(e.path), UNLABELLED) for e in top_images]
        if not keys:
            raise DataError(
                f"no images found in {root}: expected one subfolder per class, "
                "or image files directly inside for unlabelled data"
            )
        super().__init__(root, classes, keys)

    def describe(self) -> dict:
        return describe_listed(self, absolute_path(str(self.root)))


class SyntheticImages(Source):
    """A seeded, learnable synthetic set for tests and benchmarks: each class is a
    smooth random colour pattern, each sample that pattern plus its own noise."""

    def __init__(self, num_samples: int, num_classes: int, size: int = 32, seed: int = 0):
        if num_samples < 1 or num_classes < 1 or size < 1:
            raise DataError("synthetic data needs positive sample count, class count and size")
        self.num_samples, self.num_classes, self.size, self.seed = num_samples, num_classes, size, seed
        self.classes = [f"class_{c:04d}" for c in range(num_classes)]
        self.labels = np.arange(num_samples, dtype=np.int64) % num_classes
        self.fingerprint = fingerprint(
            {"synthetic": {"num_samples": num_samples, "num_classes": num_classes, "size": size, "seed": seed}}
        )

    def __len__(self) -> int:
        return self.num_samples

    def read(self, index: int) -> bytes:
        label = int(self.labels[index])
        pattern = np.random.default_rng([self.seed, label, 0]).uniform(0, 255, size=(3, 4, 4))
        noise = np.random.default_rng([self.seed, index, 1]).normal(0, 40, size=(3, self.size, self.size))
        base = torch.nn.functional.interpolate(
            torch.from_numpy(pattern)[None], size=(self.size, self.size), mode="bilinear", align_corners=False
        )[0].numpy()
        return np.clip(base + noise, 0, 255).astype(np.uint8).tobytes()

    def decode(self, data: bytes, index: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, self.size, self.size)

    def name(self, index: int) -> str:
        return f"synthetic sample {index}"

    def describe(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "num_samples": len(self),
            "classes": self.classes,
            "labelled": True,
            "location": f"synthetic:{self.num_samples}:{self.num_classes}:{self.size}",
        }


def open_source(spec: str) -> Source:
    """Open `synthetic:NUM_SAMPLES:NUM_CLASSES[:SIZE]`, COCO detection data
    (`coco:ANNOTATIONS.json[?images=FOLDER]`, see `coco.CocoDetection`), a label file,
    WebDataset shards, a Hugging Face dataset (see `sources.open_listed`) or an image folder path."""
    if spec.startswith("synthetic:"):
        try:
            numbers = [int(part) for part in spec.split(":")[1:]]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise DataError(f"bad synthetic source {spec!r}; write synthetic:NUM_SAMPLES:NUM_CLASSES[:SIZE]")
        return SyntheticImages(*numbers)
    if spec.startswith("coco:"):
        return CocoDetection(spec)
    return open_listed(spec) or ImageFolder(spec)


def is_detection(source: Source) -> bool:
    """Whether `source` is detection data (boxes, not class labels: `coco.CocoDetection`)."""
    return getattr(source, "task", "classification") == "detection"


def open_images(spec: str) -> Source:
    """The images of `spec` for a model to run on, labels unused (`kdpipe predict`):
    every image file below a local folder, in path order, whatever its layout (images
    alone, class folders, folders within folders, images beside folders); else what
    `open_source` opens."""
    if not os.path.isdir(spec):
        return open_source(spec)
    keys = [(os.path.relpath(path, spec), _size(path), UNLABELLED) for path in _images_below(spec)]
    if not keys:
        raise DataError(f"no images found in {spec} or its subfolders")
    return ImageFiles(Path(spec), None, keys)


class ViewDataset(Dataset):
    """Item k is the sample at position k % N of recipe epoch k // N, with all V of its
    views rendered from one decode. Items carry their (epoch, position, index) keys and
    realised view parameters, so a consumer can check it got what it asked for.

    `sizes` names the renders an item carries and their sides in pixels; by default
    "views" at the recipe's size. A student trained at another resolution than its
    teacher gets both renders of the same view parameters (e.g. "views" at 16 px for
    the student, "teacher_views" at 32 px). With a mixing recipe, each view is mixed
    with the same view of the sample's partner (a second decode), and the item also
    carries the partner's label and each view's lam. `content` (and `partner_content`)
    is the sha256 of the bytes the pixels were decoded from, so a replay can check that
    they are the bytes the teacher saw.
    """

    def __init__(self, source: Source, recipe: ViewRecipe, sizes: dict[str, int] | None = None):
        self.source, self.recipe = source, recipe
        self.sizes = sizes or {"views": recipe.size}
        self.fields = view_param_fields(recipe)
        self.num_samples = len(source)
        if recipe.mixup and self.num_samples > 2**24:  # partners are stored as float32
            raise DataError(f"mixing supports up to {2**24:,} samples, and the data has {self.num_samples:,}")
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.recipe.epochs * self.num_samples

    def _draw(self, kind: str, epoch: int) -> np.ndarray:
        """The epoch's sample order or mixing partners, the last two epochs' kept."""
        if (kind, epoch) not in self._orders:
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            draw = epoch_order if kind == "order" else partners
            self._orders[(kind, epoch)] = draw(self.recipe, epoch, self.num_samples)
        return self._orders[(kind, epoch)]

    def order(self, epoch: int) -> np.ndarray:
        return self._draw("order", epoch)

    def __getitem__(self, item: int) -> dict:
        recipe = self.recipe
        epoch, position = divmod(int(item), self.num_samples)
        index = int(self.order(epoch)[position])
        data = self.source.read(index)
        image, content = self.source.decode(data, index), content_digest(data)
        views = range(recipe.views_per_sample)
        params = [sample_view(recipe, epoch, index, v, (image.shape[1], image.shape[2])) for v in views]
        resize = recipe.interpolation
        renders = {name: [render(image, p, size, resize) for p in params] for name, size in self.sizes.items()}
        partner, partner_content = index, content
        if recipe.mixup:
            partner = int(self._draw("partners", epoch)[index])
            other_data = self.source.read(partner)
            other, partner_content = self.source.decode(other_data, partner), content_digest(other_data)
            other_params = [sample_view(recipe, epoch, partner, v, (other.shape[1], other.shape[2])) for v in views]
            params = [mix_view(recipe, epoch, index, v, params[v], partner) for v in views]
            renders = {
                name: [mix(pixels[v], render(other, other_params[v], self.sizes[name], resize), params[v]) for v in views]
                for name, pixels in renders.items()
            }
        return {
            "epoch": epoch,
            "position": position,
            "index": index,
            "label": int(self.source.labels[index]),
            "partner_label": int(self.source.labels[partner]),
            "partner": partner,
            "content": torch.from_numpy(content.copy()),
            "partner_content": torch.from_numpy(partner_content.copy()),
            "lam": torch.tensor([p.lam for p in params], dtype=torch.float32),
            "params": torch.from_numpy(np.stack([p.as_array(self.fields) for p in params])),
        } | {name: torch.stack(pixels) for name, pixels in renders.items()}


class RangeBatches(Sampler):
    """Batches of ViewDataset items over position ranges: for each (epoch, start, stop),
    consecutive runs of `batch_size` positions. A batch never crosses a range, so the
    batch composition of two stages matches whenever their ranges do. Under
    torch.distributed each rank gets its contiguous part of every batch."""

    def __init__(self, ranges: list[tuple[int, int, int]], num_samples: int, batch_size: int, ranks: Ranks = Ranks()):
        self.ranges, self.num_samples, self.batch_size, self.ranks = ranges, num_samples, batch_size, ranks

    def __iter__(self) -> Iterator[list[int]]:
        for epoch, start, stop in self.ranges:
            base = epoch * self.num_samples
            for first in range(start, stop, self.batch_size):
                batch = list(range(base + first, base + min(first + self.batch_size, stop)))
                yield batch[self.ranks.part(len(batch))]

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for _, start, stop in self.ranges)


class ValDataset(Dataset):
    """Each image's deterministic evaluation view (`views.eval_view`) and its label: by
    default the whole image squashed to `size`; with `resize="crop"` the standard
    protocol (shorter side to size / crop_pct, centre crop)."""

    def __init__(self, source: Source, size: int, interpolation: str = "bilinear", crop_pct: float = 1.0,
                 resize: str = "squash"):
        self.source, self.size, self.interpolation = source, size, interpolation
        self.crop_pct, self.resize = crop_pct, resize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        view = eval_view(self.source.load(index), self.size, self.crop_pct, self.interpolation, self.resize)
        return view, int(self.source.labels[index])
