"""Image folders, fingerprints and model loading."""

import os

import pytest
import torch
import torchvision

from pipeline.config import ModelSpec
from pipeline.data import UNLABELLED, ImageFolder, open_source
from pipeline.errors import DataError, ModelError
from pipeline.models import Teacher, build_model, model_fingerprint, small_cnn, with_num_classes

from .conftest import write_image_folder


def test_image_folder_reads_every_mode_and_format_as_rgb(image_folder):
    source = ImageFolder(image_folder)
    assert source.classes == ["cat", "dog", "fox"]
    assert len(source) == 18 and sorted(set(source.labels)) == [0, 1, 2]
    suffixes = {p.suffix for p in source.paths}
    assert suffixes == {".png", ".jpg"}
    for i in range(len(source)):
        image = source.load(i)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[1] >= 14


def test_unlabelled_folder(tmp_path):
    source = ImageFolder(write_image_folder(tmp_path / "pool", labelled=False))
    assert source.classes is None and len(source) == 18
    assert (source.labels == UNLABELLED).all()
    assert source.describe()["labelled"] is False


def test_fingerprint_covers_paths_sizes_and_labels(tmp_path):
    a = ImageFolder(write_image_folder(tmp_path / "a"))
    b = ImageFolder(write_image_folder(tmp_path / "b"))
    assert a.fingerprint == b.fingerprint  # same content elsewhere on disk
    os.rename(tmp_path / "b" / "dog" / "dog_000.png", tmp_path / "b" / "dog" / "dog_999.png")
    assert ImageFolder(tmp_path / "b").fingerprint != a.fingerprint
    with open(tmp_path / "a" / "cat" / "cat_000.png", "ab") as f:
        f.write(b"\0")
    assert ImageFolder(tmp_path / "a").fingerprint != b.fingerprint
    c = write_image_folder(tmp_path / "c")
    os.rename(c / "cat" / "cat_000.png", c / "dog" / "cat_000.png")  # same file, other label
    assert ImageFolder(c).fingerprint != a.fingerprint


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path / "empty")
    mixed = write_image_folder(tmp_path / "mixed")
    (mixed / "stray.png").write_bytes((mixed / "cat" / "cat_000.png").read_bytes())
    with pytest.raises(DataError, match="mixes images"):
        ImageFolder(mixed)
    broken = write_image_folder(tmp_path / "broken")
    (broken / "cat" / "cat_000.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image .*cat_000.png"):
        ImageFolder(broken).load(0)


def test_synthetic_source_is_deterministic():
    a, b = open_source("synthetic:10:3:8"), open_source("synthetic:10:3:8")
    assert a.fingerprint == b.fingerprint != open_source("synthetic:10:3:9").fingerprint
    assert torch.equal(a.load(4), b.load(4)) and a.load(4).shape == (3, 8, 8)
    with pytest.raises(DataError, match="synthetic"):
        open_source("synthetic:ten")


def test_torchvision_builtin_and_user_models_build():
    for name in ("torchvision:resnet18", "kdpipe:cnn", "kdpipe:mlp", "tests.toy_models:tiny_cnn"):
        model = build_model(ModelSpec(name, num_classes=7))
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    # the same seed gives the same initial weights
    assert model_fingerprint(build_model(ModelSpec("kdpipe:cnn", 3))) == model_fingerprint(build_model(ModelSpec("kdpipe:cnn", 3)))


@pytest.mark.parametrize(
    "name, message",
    [
        ("torchvision:resnet9000", "unknown torchvision"),
        ("kdpipe:transformer", "unknown built-in"),
        ("no_such_module:factory", "cannot load model factory"),
        ("tests.toy_models:missing", "cannot load model factory"),
        ("tests.toy_models:not_a_module", "not a torch.nn.Module"),
        ("tests.toy_models:no_class_count", "must accept num_classes"),
        ("resnet18", "bad model name"),
    ],
)
def test_unknown_models_are_refused(name, message):
    with pytest.raises(ModelError, match=message):
        build_model(ModelSpec(name, num_classes=3))


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp"])
def test_weights_load_from_state_dicts_and_checkpoints(tmp_path, wrap):
    net = torchvision.models.get_model("resnet18", num_classes=4)
    state = net.state_dict()
    obj = {
        "plain": state,
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    model = build_model(ModelSpec("torchvision:resnet18", num_classes=4, weights=str(tmp_path / "w.pt")))
    assert torch.equal(model.net.fc.weight, net.fc.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(small_cnn(3, width=16).state_dict(), tmp_path / "narrow.pt")  # another width: not only the head differs
    with pytest.raises(ModelError, match="do not fit"):
        build_model(ModelSpec("kdpipe:cnn", num_classes=3, weights=str(tmp_path / "narrow.pt")))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot read weights"):
        build_model(ModelSpec("kdpipe:cnn", num_classes=3, weights=str(tmp_path / "junk.pt")))
    with pytest.raises(ModelError, match="does not exist"):
        build_model(ModelSpec("kdpipe:cnn", num_classes=3, weights=str(tmp_path / "none.pt")))


def test_class_count_is_resolved_from_the_data_or_refused():
    assert with_num_classes(ModelSpec("kdpipe:cnn"), ["a", "b"], "teacher").num_classes == 2
    with pytest.raises(ModelError, match="3 classes but the data has 2"):
        with_num_classes(ModelSpec("kdpipe:cnn", num_classes=3), ["a", "b"], "teacher")
    with pytest.raises(ModelError, match="--num-classes"):
        with_num_classes(ModelSpec("kdpipe:cnn"), None, "teacher")


def test_teacher_runs_in_eval_mode_and_fingerprints_its_weights():
    teacher = Teacher(ModelSpec("kdpipe:cnn", num_classes=5), size=16)
    assert not teacher.model.training
    logits = teacher(torch.rand(4, 3, 16, 16))
    assert logits.shape == (4, 5) and logits.dtype == torch.float32
    model = build_model(ModelSpec("kdpipe:cnn", num_classes=5))
    assert teacher.fingerprint == model_fingerprint(model, model.preprocessing)
    assert teacher.fingerprint.startswith("sha256:")
