"""COCO detection data: the boxes a COCO file holds reach `targets` exactly (x, y, w, h
as x0, y0, x1, y1; category ids as places in `classes` + 1), the fingerprint follows the
annotations and the files, every kind of bad annotation is one DataError naming it, and
the built-in digit scenes are the same bytes every run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.coco import write_digit_scenes
from pipeline.config import UNLABELLED
from pipeline.data import open_source
from pipeline.errors import DataError

# (file, width, height); c.png has no annotations
IMAGES = (("a.png", 20, 16), ("b.png", 12, 10), ("c.png", 8, 8))


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, width, height in IMAGES:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)


def document() -> dict:
    """A small COCO file over IMAGES: ids out of order in both lists, a crowd box, a box
    overshooting its image by less than a pixel."""
    return {
        "images": [
            {"id": 5, "file_name": "b.png", "width": 12, "height": 10},
            {"id": 2, "file_name": "a.png", "width": 20, "height": 16},
            {"id": 9, "file_name": "c.png", "width": 8, "height": 8},
        ],
        "annotations": [
            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 12, "image_id": 5, "category_id": 3, "bbox": [-0.4, 1, 12.8, 8], "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [0.5, 0, 4, 4.5], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


@pytest.fixture
def coco(tmp_path) -> Path:
    """The annotation file of `document()` beside its images."""
    write_images(tmp_path)
    (tmp_path / "instances.json").write_text(json.dumps(document()))
    return tmp_path / "instances.json"


def fingerprint_of(path: Path) -> str:
    return open_source(f"coco:{path}").describe()["fingerprint"]


def test_targets_are_the_files_boxes_as_corners_with_labels_from_one(coco):
    source = open_source(f"coco:{coco}")
    assert source.task == "detection"
    assert source.classes == ["cat", "dog"] and source.category_ids == [3, 7]
    assert [Path(source.name(i)).name for i in range(len(source))] == ["a.png", "b.png", "c.png"]  # by image id
    assert source.labels.dtype == np.int64 and (source.labels == UNLABELLED).all()
    a, b, c = (source.targets(i) for i in range(3))
    np.testing.assert_array_equal(a["boxes"], np.array([[1, 2, 11, 7], [0.5, 0, 4.5, 4.5]], dtype=np.float32))
    np.testing.assert_array_equal(a["labels"], [2, 1])  # dog (id 7) is classes[1], cat (id 3) classes[0]
    np.testing.assert_array_equal(a["crowd"], [False, True])
    np.testing.assert_array_equal(b["boxes"], [[0, 1, 12, 9]])  # clipped to the 12 px wide image
    assert (a["boxes"].dtype, a["labels"].dtype, a["crowd"].dtype) == (np.float32, np.int64, np.bool_)
    assert c["boxes"].shape == (0, 4) and c["labels"].shape == (0,) and c["crowd"].shape == (0,)
    assert tuple(source.load(0).shape) == (3, 16, 20) and source.load(0).dtype == torch.uint8
    unpickled = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(unpickled.targets(0)["boxes"], a["boxes"])
    described = source.describe()
    assert described | {"fingerprint": None} == {
        "fingerprint": None, "num_samples": 3, "classes": ["cat", "dog"], "labelled": True,
        "location": f"coco:{coco}", "task": "detection"}


def test_images_option_names_the_images_folder(tmp_path):
    write_images(tmp_path / "pictures")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(document()))
    spec = f"coco:{tmp_path / 'annotations' / 'val.json'}?images={tmp_path / 'pictures'}"
    source = open_source(spec)
    assert source.name(0) == str(tmp_path / "pictures" / "a.png")
    assert open_source(source.describe()["location"]).describe() == source.describe()
    with pytest.raises(DataError, match=r"a\.png \(id 2\).*\?images="):
        open_source(f"coco:{tmp_path / 'annotations' / 'val.json'}")  # the images are not beside the file
    with pytest.raises(DataError, match="unknown option 'root="):
        open_source(f"coco:{tmp_path / 'annotations' / 'val.json'}?root={tmp_path}")


def test_fingerprint_follows_annotations_and_files_not_formatting(coco):
    before = fingerprint_of(coco)
    assert fingerprint_of(coco) == before
    coco.write_text(json.dumps(document(), indent=4, sort_keys=True))  # same content, other bytes
    assert fingerprint_of(coco) == before
    moved = document()
    moved["annotations"][0]["bbox"] = [2, 2, 10, 5]
    coco.write_text(json.dumps(moved))
    assert fingerprint_of(coco) != before
    relabelled = document()
    relabelled["annotations"][0]["category_id"] = 3
    coco.write_text(json.dumps(relabelled))
    assert fingerprint_of(coco) != before
    coco.write_text(json.dumps(document()))
    assert fingerprint_of(coco) == before
    Image.new("RGB", (8, 8), (200, 10, 10)).save(coco.parent / "c.png")  # an image without boxes changes
    assert fingerprint_of(coco) != before


def test_decoded_size_must_match_the_file(coco):
    wrong = document()
    wrong["images"][1]["width"] = 21
    coco.write_text(json.dumps(wrong))
    source = open_source(f"coco:{coco}")
    with pytest.raises(DataError, match=r"a\.png \(id 2\) is 20x16 pixels.*says 21x16"):
        source.load(0)


def edit(change):
    """A `document()` changed by `change(doc)`, for the bad-input cases."""
    def edited() -> dict:
        doc = document()
        change(doc)
        return doc
    return edited


def set_annotation(**fields):
    return edit(lambda doc: doc["annotations"][0].update(fields))


def set_image(**fields):
    return edit(lambda doc: doc["images"][1].update(fields))


BAD_DOCUMENTS = {
    "no images": (edit(lambda doc: doc.pop("images")), 'has no "images" list'),
    "no annotations": (edit(lambda doc: doc.pop("annotations")), 'has no "annotations" list'),
    "categories not a list": (edit(lambda doc: doc.update(categories={})), 'has no "categories" list'),
    "not an object": (lambda: [document()], "expected a JSON object"),
    "image file missing": (set_image(file_name="gone.png"), r"image gone\.png \(id 2\): cannot read .*gone\.png"),
    "image id twice": (edit(lambda doc: doc["images"][2].update(id=5)),
                       r"image id 5 is used twice \(b\.png and c\.png\)"),
    "category id twice": (edit(lambda doc: doc["categories"].append({"id": 7, "name": "eel"})),
                          "category id 7 is used twice"),
    "category name twice": (edit(lambda doc: doc["categories"].append({"id": 8, "name": "dog"})),
                            "category name 'dog' is used twice"),
    "zero width image": (set_image(width=0), r"image a\.png \(id 2\) has width 0"),
    "float height": (set_image(height=16.0), r"image a\.png \(id 2\) has width 20 and height 16\.0"),
    "unknown image_id": (set_annotation(image_id=99), r"annotation 11: image_id 99 is not an image"),
    "unknown category_id": (set_annotation(category_id=4),
                            r"annotation 11 \(image a\.png\): category_id 4 is not a category "
                            r"\(the categories are 3, 7\)"),
    "zero width box": (set_annotation(bbox=[1, 2, 0, 5]),
                       r"annotation 11 \(image a\.png\): bbox \[1, 2, 0, 5\] has a width"),
    "negative height box": (set_annotation(bbox=[1, 2, 3, -1]), r"annotation 11 .*bbox \[1, 2, 3, -1\] has a width"),
    "three numbers": (set_annotation(bbox=[1, 2, 3]),
                      r"annotation 11 .*bbox \[1, 2, 3\] is not \[x, y, width, height\]"),
    "no bbox": (edit(lambda doc: doc["annotations"][0].pop("bbox")), r"annotation 11 .*bbox None is not"),
    "text bbox": (set_annotation(bbox=["1", 2, 3, 4]), r"annotation 11 .*is not \[x, y, width, height\]"),
    "box past the right edge": (set_annotation(bbox=[15, 2, 6.5, 5]), r"annotation 11 .*reaches outside the 20x16"),
    "box above the top": (set_annotation(bbox=[1, -1.5, 3, 5]), r"annotation 11 .*reaches outside the 20x16"),
    "box past the bottom": (set_annotation(bbox=[1, 10, 3, 7.5]), r"annotation 11 .*reaches outside"),
    "box in the tolerance only": (set_annotation(bbox=[-0.9, 1, 0.5, 3]), r"annotation 11 .*lies outside"),
    "annotation id twice": (edit(lambda doc: doc["annotations"][1].update(id=11)), "annotation 11 is listed twice"),
    "bad iscrowd": (set_annotation(iscrowd=2), r"annotation 11 .*iscrowd 2"),
    "annotation without id": (edit(lambda doc: doc["annotations"][2].pop("id")),
                              r"annotations\[2\] needs an integer id"),
    "no categories": (edit(lambda doc: doc.update(categories=[])), "has no categories"),
}


@pytest.mark.parametrize("case", BAD_DOCUMENTS)
def test_bad_annotation_file_is_one_data_error_naming_the_culprit(coco, case):
    make, message = BAD_DOCUMENTS[case]
    coco.write_text(json.dumps(make()))
    with pytest.raises(DataError, match=message) as raised:
        open_source(f"coco:{coco}")
    assert "\n" not in str(raised.value)


def test_unreadable_annotation_files(tmp_path):
    with pytest.raises(DataError, match=r"annotation file .*missing\.json does not exist"):
        open_source(f"coco:{tmp_path / 'missing.json'}")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON"):
        open_source(f"coco:{tmp_path / 'broken.json'}")
    with pytest.raises(DataError, match=r"cannot read annotation file"):
        open_source(f"coco:{tmp_path}")  # a folder


def test_digit_scenes_open_as_coco_with_their_boxes(tmp_path):
    paths = write_digit_scenes(tmp_path, num_train=16, num_val=4)
    assert paths == {"train": tmp_path / "train.json", "val": tmp_path / "val.json", "images": tmp_path / "images"}
    train, val = (json.loads(paths[split].read_text()) for split in ("train", "val"))
    annotation_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(annotation_ids)) == len(annotation_ids)
    source = open_source(f"coco:{paths['train']}")
    assert len(source) == 16 and len(open_source(f"coco:{paths['val']}")) == 4
    assert source.classes == [str(digit) for digit in range(10)] and source.category_ids == list(range(1, 11))
    assert len(set(source.image_sizes)) > 1  # not every scene has the same size
    for index, image in enumerate(train["images"]):
        pixels = source.load(index)
        assert tuple(pixels.shape) == (3, image["height"], image["width"])
        annotations = [a for a in train["annotations"] if a["image_id"] == image["id"]]
        assert 1 <= len(annotations) <= 3
        targets = source.targets(index)
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]
        np.testing.assert_array_equal(targets["boxes"], np.array(expected, dtype=np.float32))
        np.testing.assert_array_equal(targets["labels"], [a["category_id"] for a in annotations])  # digit d: label d+1
        for x0, y0, x1, y1 in targets["boxes"].astype(int):  # a digit stands out from the photo around it
            inside = pixels[:, y0:y1, x0:x1].float()
            assert (inside.amax(dim=(1, 2)) - inside.amin(dim=(1, 2))).max() > 60


def test_digit_scenes_are_the_same_bytes_every_run(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {path.relative_to(root).as_posix(): path.read_bytes()
                for path in sorted(root.rglob("*")) if path.is_file()}

    for folder, seed in (("first", 0), ("again", 0), ("other", 1)):
        write_digit_scenes(tmp_path / folder, num_train=6, num_val=2, seed=seed)
    first = files(tmp_path / "first")
    assert len(first) == 10 and first == files(tmp_path / "again")
    assert first != files(tmp_path / "other")
    assert fingerprint_of(tmp_path / "first" / "train.json") == fingerprint_of(tmp_path / "again" / "train.json")
