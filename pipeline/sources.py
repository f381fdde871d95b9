"""What a data source is, and the sources that are not a plain image folder.

`Source` is the interface every source offers; `pipeline/data.py` holds the image folder
and the synthetic set and opens any source by its spec (`data.open_source`). Here:

    LabelFile          labels.csv / labels.jsonl: (path, label) rows over a folder
    WebDatasetShards   'shards/train-{000000..000146}.tar': WebDataset image shards, local or remote
    HuggingFaceDataset hf:PATH: a dataset saved with `save_to_disk`, or parquet files

Options follow the path as a URL-style query (`labels.csv?root=/data/val&classes=classes.txt`).
Every listed source is fingerprinted the same way (`listing_fingerprint`), so the same
files under the same names, sizes and labels give the same fingerprint whatever holds them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from .config import UNLABELLED, absolute_path, canonical_json
from .errors import DataError, first_line
from .store import Location, write_local_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# a label file's path column, first found wins (file_name: a Hugging Face imagefolder's metadata.csv)
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image")
TAR_BLOCK = 512


class Source(Protocol):
    """What every data source offers. A sample is stored bytes (`read`) that decode to
    an image (`decode`); the sha256 of those bytes is the sample's content identity, which
    an archive records and a replay checks (see `data.content_digest`). A source is pickled
    into DataLoader workers, so it holds no open files: each read opens what it needs."""

    labels: np.ndarray  # int64, UNLABELLED where a sample has no label
    classes: list[str] | None  # None for unlabelled data

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes:
        """The sample's stored bytes (an image file's bytes)."""
        ...

    def decode(self, data: bytes, index: int) -> torch.Tensor:
        """The image those bytes hold, as uint8 RGB (3, H, W)."""
        ...

    def load(self, index: int) -> torch.Tensor:
        """The decoded image of sample `index` (sources that subclass Source inherit this)."""
        return self.decode(self.read(index), index)

    def name(self, index: int) -> str:
        """What a message calls sample `index` (its file's path)."""
        ...

    def describe(self) -> dict:
        """What the manifest records: fingerprint, num_samples, classes, labelled, and a
        location that `data.open_source` opens again (absolute paths, options kept)."""
        ...


# --- shared by every source ------------------------------------------------------------


def is_image(name: str) -> bool:
    """Whether a file name is an image kdpipe reads (by extension; hidden names are not)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _rgb8(image: Image.Image) -> np.ndarray:
    """Any PIL image as uint8 RGB (H, W, 3). 16-bit and 32-bit grayscale are scaled down
    to 8 bits (PIL's own conversion would clip them at 255); other modes (palette, CMYK,
    LA, RGBA, ...) go through PIL's RGB conversion."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def decode_image(data: bytes, what: str) -> torch.Tensor:
    """Encoded image bytes (any PIL-readable format and mode) as uint8 RGB (3, H, W); an
    error names `what` the bytes are (a file, a shard's member)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = _rgb8(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {what}: {first_line(exc)}; fix or remove the file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_image_file(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}; fix or remove the file") from None


def listing_fingerprint(classes: list[str] | None, keys: list[tuple[str, int, int]]) -> str:
    """The fingerprint of a listed dataset (docs/format.md, Fingerprints): its classes,
    then every sample's (name, size in bytes, label) in sample order."""
    digest = hashlib.sha256(canonical_json({"classes": classes}).encode())
    for key in keys:
        digest.update(canonical_json(key).encode() + b"\n")
    return "sha256:" + digest.hexdigest()


def parse_spec(spec: str, options: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """A source spec split into its path and its `?key=value&...` options."""
    path, _, query = spec.partition("?")
    found = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key not in options or not value:
            raise DataError(f"unknown option {part!r} in {spec}; this source takes "
                            + ", ".join(f"{option}=..." for option in options))
        found[key] = urllib.parse.unquote(value)
    return path, found


def with_query(path: str, options: dict[str, str]) -> str:
    """The spec `parse_spec` splits back into `path` and `options`."""
    query = "&".join(f"{key}={urllib.parse.quote(value, safe='/:')}" for key, value in sorted(options.items()))
    return f"{path}?{query}" if query else path


def read_class_map(path: str) -> list[str]:
    """Class names in index order: a text file with one name per line, or JSON (a list of
    names, or {name: index})."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read class map {path}: {exc.strerror or exc}; fix ?classes=") from None
    if path.endswith(".json"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise DataError(f"class map {path} is not valid JSON ({exc}); fix or replace it") from None
        if isinstance(value, dict) and not all(isinstance(i, int) and not isinstance(i, bool) for i in value.values()):
            raise DataError(f"class map {path} must map each class name to its index, an integer")
        names = sorted(value, key=value.get) if isinstance(value, dict) else value
        if isinstance(value, dict) and sorted(value.values()) != list(range(len(value))):
            raise DataError(f"class map {path} must give the indices 0..{len(value) - 1}, each once")
    else:
        names = [line.strip() for line in text.strip().splitlines()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise DataError(f"class map {path} must list distinct, non-empty class names (one per line, or JSON)")
    return names


def _as_index(label: str | int) -> int | None:
    """A label that is a class index (a JSON integer, or text of digits), else None."""
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    return int(label) if isinstance(label, str) and label.isdigit() else None


def resolve_labels(raw: list[str | int], class_map: list[str] | None,
                   where: Callable[[int], str]) -> tuple[np.ndarray, list[str]]:
    """Labels as indices, and the classes. A label is a class name or an index into the
    class map; without a map, the classes are the sorted distinct names. `where(i)` says
    where the i-th label was found, for errors."""
    bad = next((i for i, label in enumerate(raw)
                if not (isinstance(label, int) and not isinstance(label, bool) or isinstance(label, str) and label.strip())),
               None)
    if bad is not None:
        raise DataError(f"{where(bad)}: label {raw[bad]!r} is neither a class name nor a class index; "
                        "give every sample its class")
    if class_map is None:
        numbered = next((i for i, label in enumerate(raw) if _as_index(label) is not None), None)
        if numbered is not None:
            raise DataError(f"{where(numbered)}: label {raw[numbered]!r} is a class index, and there is no class map; "
                            "add ?classes=FILE (one class name per line) or use class names")
        class_map = sorted(set(raw))
    index = {name: i for i, name in enumerate(class_map)}
    labels = np.empty(len(raw), dtype=np.int64)
    for i, label in enumerate(raw):
        found = index.get(label) if isinstance(label, str) else None
        found = _as_index(label) if found is None else found
        if found is None or not 0 <= found < len(class_map):
            raise DataError(f"{where(i)}: label {label!r} is not in the class map ({len(class_map)} classes); "
                            "fix the label or the class map")
        labels[i] = found
    return labels, class_map


def _absolute(options: dict[str, str], *path_options: str) -> dict[str, str]:
    return {key: absolute_path(value) if key in path_options else value for key, value in options.items()}


def describe_listed(source: ImageFiles | WebDatasetShards | HuggingFaceDataset, location: str) -> dict:
    """`Source.describe` of a source fingerprinted by `listing_fingerprint`."""
    return {
        "fingerprint": source.fingerprint,
        "num_samples": len(source),
        "classes": source.classes,
        "labelled": source.classes is not None,
        "location": location,
    }


class ImageFiles(Source):
    """Samples that are image files below `root`, each with a key (name relative to the
    root, size in bytes, label); sorted by name, which fixes the sample index. Subclasses
    find the files."""

    def __init__(self, root: Path, classes: list[str] | None, keys: list[tuple[str, int, int]]):
        keys = sorted(keys, key=lambda key: key[0])
        self.root, self.classes = root, classes
        self.paths = [root / key[0] for key in keys]
        self.labels = np.array([key[2] for key in keys], dtype=np.int64)
        self.fingerprint = listing_fingerprint(classes, keys)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        return read_image_file(self.paths[index])

    def decode(self, data: bytes, index: int) -> torch.Tensor:
        return decode_image(data, str(self.paths[index]))

    def name(self, index: int) -> str:
        return str(self.paths[index])


# --- label files -----------------------------------------------------------------------


def _csv_rows(file: io.TextIOBase, path: Path) -> Iterator[tuple[int, str, str]]:
    reader = csv.DictReader(file)
    column = next((name for name in PATH_COLUMNS if name in (reader.fieldnames or [])), None)
    if column is None or "label" not in reader.fieldnames:
        raise DataError(f"{path} needs a header naming a path column ({', '.join(PATH_COLUMNS)}) and a label "
                        f"column; its header is {reader.fieldnames}")
    for row in reader:
        if None in row or not row[column] or not row.get("label"):  # too many fields, or too few
            raise DataError(f"{path} line {reader.line_num}: malformed row; write PATH,LABEL")
        yield reader.line_num, row[column].strip(), row["label"].strip()


def _jsonl_rows(file: io.TextIOBase, path: Path) -> Iterator[tuple[int, str, str | int]]:
    for number, line in enumerate(file, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        column = next((name for name in PATH_COLUMNS if name in row), None) if isinstance(row, dict) else None
        if column is None or not isinstance(row[column], str) or not isinstance(row.get("label"), (str, int)):
            raise DataError(f'{path} line {number}: malformed row; write {{"path": "...", "label": ...}}')
        yield number, row[column], row["label"]


def _label_rows(path: Path) -> list[tuple[int, str, str | int]]:
    """(line number, image path, label) of every row of a .csv (with a header) or .jsonl file."""
    rows = _csv_rows if path.suffix.lower() == ".csv" else _jsonl_rows
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            return list(rows(file, path))
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a readable label file ({exc}); write UTF-8 CSV or JSON lines") from None


class LabelFile(ImageFiles):
    """Images listed with their labels in a .csv or .jsonl file: `labels.csv[?root=DIR][&classes=FILE]`.
    Paths are relative to `root` (default: the label file's folder) or absolute."""

    def __init__(self, spec: str):
        path, options = parse_spec(spec, ("root", "classes"))
        self.file, self.options = Path(absolute_path(path)), _absolute(options, "root", "classes")
        root = Path(self.options.get("root", self.file.parent))
        rows = _label_rows(self.file)
        if not rows:
            raise DataError(f"label file {self.file} lists no images; add PATH,LABEL rows")
        first_line: dict[str, int] = {}
        for line, name, _ in rows:
            key = os.path.realpath(root / name)  # the same file however the row writes its path
            if key in first_line:
                raise DataError(f"{self.file} line {line}: {name} is listed twice (also on line {first_line[key]}); "
                                "list each image once")
            first_line[key] = line
        class_map = read_class_map(self.options["classes"]) if "classes" in self.options else None
        labels, classes = resolve_labels([label for *_, label in rows], class_map,
                                         lambda i: f"{self.file} line {rows[i][0]}")
        keys = [(os.path.normpath(name), self._size(root, name, line), int(label))
                for (line, name, _), label in zip(rows, labels)]
        super().__init__(root, classes, keys)

    def _size(self, root: Path, name: str, line: int) -> int:
        try:
            return os.stat(root / name).st_size
        except OSError as exc:
            raise DataError(f"{self.file} line {line}: cannot read {root / name}: {exc.strerror or exc}; "
                            "fix the row, or point ?root= at the images' folder") from None

    def describe(self) -> dict:
        return describe_listed(self, with_query(str(self.file), self.options))


# --- WebDataset shards -----------------------------------------------------------------


def cache_folder(kind: str) -> Path:
    """kdpipe's cache of derived data (shard indexes, downloaded shards): $KDPIPE_CACHE,
    else $XDG_CACHE_HOME/kdpipe, else ~/.cache/kdpipe. Never beside the user's data."""
    base = os.environ.get("KDPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kdpipe")
    return Path(base) / kind


def _cache_name(*identity: object) -> str:
    return hashlib.sha256("\0".join(map(str, identity)).encode()).hexdigest()[:32]


def fetch_shard(url: str) -> str:
    """A local copy of a remote shard, downloaded once into the cache and found again by
    its URL, size and ETag (a changed shard is downloaded anew)."""
    parent, _, name = url.rpartition("/")
    location = Location(parent)
    try:
        info = location.fs.info(location.path(name))
    except FileNotFoundError:
        raise DataError(f"shard {url} does not exist; check the shard pattern") from None
    except Exception as exc:  # noqa: BLE001 - remote stores raise many types
        raise DataError(f"cannot reach shard {url}: {' '.join(str(exc).split())[:200]}") from None
    target = cache_folder("shards") / f"{_cache_name(url, info.get('size'), info.get('ETag', info.get('etag')))}-{name}"
    if not target.is_file():
        data = location.read(name)
        try:
            write_local_atomic(target, data)
        except OSError as exc:
            raise DataError(f"cannot store shard {url} in {target.parent}: {exc.strerror or exc}; "
                            "set KDPIPE_CACHE to a writable folder") from None
    return str(target)


def _scan_shard(path: str, url: str) -> list[list]:
    """[name, data offset, size, label text or None] of every file in a tar shard; a
    `.cls` member's text is read on the way (it is the sample's label)."""
    def broken(reason: str) -> DataError:
        return DataError(f"shard {url} is not a readable tar file ({reason}); re-create or re-download it")

    members = []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    raise broken(f"truncated inside {member.name}")
                if member.isfile():
                    text = tar.extractfile(member).read().decode().strip() if member.name.endswith(".cls") else None
                    members.append([member.name, member.offset_data, member.size, text])
            tar.fileobj.seek(tar.offset)  # tarfile stops quietly at a cut header: the end marker must follow
            end = tar.fileobj.read(TAR_BLOCK)
    except (tarfile.TarError, UnicodeDecodeError) as exc:
        raise broken(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read shard {url}: {exc.strerror or exc}") from None
    if len(end) < TAR_BLOCK or any(end):
        raise broken("truncated: no end-of-archive marker after its last member")
    return members


def shard_members(path: str, url: str) -> list[list]:
    """`_scan_shard`, cached in the cache folder by the shard's path, size and mtime: a
    replay reopens the source in every process, and a rescan would read every header."""
    stat = os.stat(path)
    index = cache_folder("shard-index") / f"{_cache_name(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)}.json"
    try:
        return json.loads(index.read_bytes())
    except (OSError, ValueError):
        pass
    members = _scan_shard(path, url)
    try:
        write_local_atomic(index, json.dumps(members).encode())
    except OSError:
        pass  # an unwritable cache costs a rescan next time, nothing else
    return members


def _group(members: list[list]) -> dict[str, dict[str, list]]:
    """Members grouped into samples by key (the path up to the first dot of the file
    name, as WebDataset does), in stored order: {key: {extension: member}}."""
    samples: dict[str, dict[str, list]] = {}
    for member in members:
        folder, _, file_name = member[0].rpartition("/")
        stem, dot, extension = file_name.partition(".")
        if dot:
            sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
            if extension.lower() in sample:
                raise DataError(f"{member[0]} is in the shard twice (or under two names that differ only in case); "
                                "each sample's members must be unique")
            sample[extension.lower()] = member
    return samples


class WebDatasetShards(Source):
    """WebDataset image shards: `shards/train-{000000..000146}.tar[?classes=FILE]`, local
    paths or http(s)://, s3://, gs:// URLs (downloaded once into the cache). A sample is
    its members sharing a key: an image (.jpg, .png, ...) and, when labelled, a `.cls`
    (a class index, or a class name). Samples keep their stored order, shard by shard."""

    def __init__(self, spec: str):
        pattern, options = parse_spec(spec, ("classes",))
        self.pattern = absolute_path(pattern)
        self.options = _absolute(options, "classes")
        self.urls = list(braceexpand(self.pattern))
        self.files = [self._local(url) for url in self.urls]
        shard_of, names, offsets, sizes, raw = [], [], [], [], []
        for shard, (url, path) in enumerate(zip(self.urls, self.files)):
            for key, sample in _group(shard_members(path, url)).items():
                image = next((m for ext, m in sample.items() if f".{ext}" in IMAGE_EXTENSIONS), None)
                if image is None:
                    raise DataError(f"sample {key} in shard {url} has no image member (it has "
                                    f"{', '.join(sorted(sample))}); add one, e.g. {key}.jpg")
                shard_of.append(shard)
                names.append(image[0])
                offsets.append(image[1])
                sizes.append(image[2])
                raw.append(sample["cls"][3] if "cls" in sample else None)
        if not names:
            raise DataError(f"the shards {self.pattern} hold no samples; write KEY.jpg (and KEY.cls) members")
        self.shard_of, self.names = np.array(shard_of, dtype=np.int32), names
        self.offsets, self.sizes = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
        self.labels, self.classes = self._labels(raw)
        keys = [(name, size, label) for name, size, label in zip(names, sizes, self.labels.tolist())]
        self.fingerprint = listing_fingerprint(self.classes, keys)

    def _local(self, url: str) -> str:
        if "://" in url:
            return fetch_shard(url)
        if not os.path.isfile(url):
            raise DataError(f"shard {url} does not exist (from the pattern {self.pattern}); check the pattern")
        return url

    def _labels(self, raw: list[str | None]) -> tuple[np.ndarray, list[str] | None]:
        """Labels from the `.cls` members: all samples have one, or none does (unlabelled)."""
        missing = [i for i, text in enumerate(raw) if text is None]
        if len(missing) == len(raw):
            return np.full(len(raw), UNLABELLED, dtype=np.int64), None
        if missing:
            raise DataError(f"{self.name(missing[0])} has no .cls member, and other samples have one; "
                            "label every sample or none")
        class_map = read_class_map(self.options["classes"]) if "classes" in self.options else None
        return resolve_labels(raw, class_map, lambda i: f"the .cls of {self.name(i)}")

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> bytes:
        shard, size = int(self.shard_of[index]), int(self.sizes[index])
        try:
            with open(self.files[shard], "rb") as file:
                file.seek(int(self.offsets[index]))
                data = file.read(size)
        except OSError as exc:
            raise DataError(f"cannot read shard {self.urls[shard]}: {exc.strerror or exc}") from None
        if len(data) != size:
            raise DataError(f"shard {self.urls[shard]} ends inside {self.names[index]}: it changed since it was "
                            "indexed; re-create or re-download it")
        return data

    def decode(self, data: bytes, index: int) -> torch.Tensor:
        return decode_image(data, self.name(index))

    def name(self, index: int) -> str:
        return f"{self.names[index]} in shard {self.urls[int(self.shard_of[index])]}"

    def describe(self) -> dict:
        return describe_listed(self, with_query(self.pattern, self.options))


# --- Hugging Face datasets -------------------------------------------------------------


def is_huggingface_dataset(path: str) -> bool:
    """A folder written by `save_to_disk` (a Dataset or a DatasetDict), or parquet files."""
    folder = Path(path)
    if path.lower().endswith(".parquet"):
        return True
    return folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()
                                or any(folder.glob("*.parquet")))


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets package: pip install 'kdpipe[hf]'") from None
    datasets.disable_progress_bars()  # stderr carries kdpipe's own status lines and errors
    return datasets


def _load_huggingface(datasets, path: str, split: str | None):
    """The Dataset at `path`: one split of a saved DatasetDict, a saved Dataset, or parquet
    files; `datasets` is the imported package."""
    not_a_dataset = (f"{path} is not a Hugging Face dataset: expected a folder written by save_to_disk "
                     "(dataset_info.json, state.json), a DatasetDict folder, or .parquet files")
    folder = Path(path)
    parquet = [path] if folder.is_file() else sorted(map(str, folder.glob("*.parquet")))
    try:
        if path.lower().endswith(".parquet") or (folder.is_dir() and parquet):
            loaded = datasets.Dataset.from_parquet(parquet, cache_dir=str(cache_folder("huggingface")))
        else:
            loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(not_a_dataset) from None
    except Exception as exc:  # noqa: BLE001 - datasets and pyarrow raise many types for files they cannot read
        raise DataError(f"cannot read the Hugging Face dataset {path}: {first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or ("train" if "train" in loaded else None)
        if split not in loaded:
            raise DataError(f"{path} holds the splits {', '.join(loaded)}; choose one with ?split=NAME")
        return loaded[split]
    if split:
        raise DataError(f"{path} is a single dataset with no splits; drop ?split=")
    return loaded


class HuggingFaceDataset(Source):
    """A Hugging Face dataset: `hf:PATH[?split=S][&image=COLUMN][&label=COLUMN][&classes=FILE]`,
    PATH a folder written by `save_to_disk` or parquet files. The image column is the first
    `Image` feature, the label column the first `ClassLabel` (whose names are the classes);
    the images are read as their stored bytes, never decoded by `datasets`."""

    def __init__(self, spec: str):
        path, options = parse_spec(spec.removeprefix("hf:"), ("split", "image", "label", "classes"))
        self.path, self.options = absolute_path(path), _absolute(options, "classes")
        datasets = _import_datasets()
        dataset = _load_huggingface(datasets, self.path, options.get("split"))
        features = dataset.features
        image = options.get("image") or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        label = options.get("label") or next(
            (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        for option, column in (("image", image), ("label", label)):
            if column not in features and (column is not None or option == "image"):  # a label is optional
                named = f" {column!r}" if column else ""
                raise DataError(f"{self.path} has no {option} column{named}; name one with ?{option}=COLUMN "
                                f"(columns: {', '.join(features)})")
        self.column = image
        self.dataset = dataset.cast_column(image, datasets.Image(decode=False)).select_columns([image])
        table = self.dataset.with_format("arrow")[:]  # memory-mapped: no image is copied
        raw = dataset.select_columns([label]).with_format("arrow")[:][label].to_pylist() if label else None
        self.labels, self.classes = self._labels(raw, features.get(label))
        self.fingerprint = listing_fingerprint(self.classes, self._keys(table[image]))

    def _labels(self, raw: list | None, feature) -> tuple[np.ndarray, list[str] | None]:
        if raw is None:
            return np.full(len(self.dataset), UNLABELLED, dtype=np.int64), None
        if hasattr(feature, "names") and "classes" not in self.options:  # a ClassLabel
            unlabelled = next((row for row, label in enumerate(raw) if label is None or label < 0), None)
            if unlabelled is not None:
                raise DataError(f"row {unlabelled} of {self.path} has no label (ClassLabel -1, as in a test split); "
                                "use a labelled split, or drop its labels with ?label= of another column")
            return np.array(raw, dtype=np.int64), list(feature.names)
        class_map = read_class_map(self.options["classes"]) if "classes" in self.options else None
        return resolve_labels(raw, class_map, lambda i: f"row {i} of {self.path}")

    def _keys(self, images) -> list[tuple[str, int, int]]:
        """(recorded path or `row N`, size in bytes, label) of every row; `images` is the
        image column as arrow {bytes, path} structs, measured without copying the bytes."""
        import pyarrow.compute as compute  # installed with datasets

        sizes = compute.binary_length(compute.struct_field(images, "bytes")).to_pylist()
        paths = compute.struct_field(images, "path").to_pylist()
        keys = []
        for row, (size, path, label) in enumerate(zip(sizes, paths, self.labels.tolist())):
            if size is None:  # no stored bytes: the image is the file the row names
                if not path:
                    raise DataError(f"row {row} of {self.path} holds no image (no bytes, no path); fix the dataset")
                size = len(read_image_file(path))
            keys.append((path or f"row {row}", size, label))
        return keys

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> bytes:
        image = self.dataset[index][self.column]
        return image["bytes"] if image["bytes"] is not None else read_image_file(image["path"])

    def decode(self, data: bytes, index: int) -> torch.Tensor:
        return decode_image(data, self.name(index))

    def name(self, index: int) -> str:
        return f"row {index} of {self.path}"

    def describe(self) -> dict:
        return describe_listed(self, with_query(f"hf:{self.path}", self.options))


def open_listed(spec: str) -> Source | None:
    """The source a spec names when it is a label file, WebDataset shards or a Hugging Face
    dataset; None when it is none of these (an image folder, to `data.open_source`)."""
    path = spec.partition("?")[0]
    if spec.startswith("hf:") or is_huggingface_dataset(path):
        return HuggingFaceDataset(spec)
    if path.lower().endswith((".csv", ".jsonl")):
        return LabelFile(spec)
    if path.endswith(".tar"):
        return WebDatasetShards(spec)
    return None
