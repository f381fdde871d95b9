"""The docs run and render.

- Every markdown file renders: no unclosed code fence, no closing fence with text after
  it, no dead internal link (a relative file, or a `#heading` anchor as GitHub computes it).
- The Python blocks of docs/format.md (the spec's reader, its re-derivation of the view
  parameters, its teacher fingerprint) run against real archives of both backends and
  every codec, with one sample and with one class, and give exactly what kdpipe gives.
- docs/cli.md's option reference is the one tools/cli_reference.py generates from the CLI.
- Every ```bash block of README.md and docs/*.md runs as written (the install and test
  commands aside; cli.md's tiny bench is tests/test_bench.py's command). README's
  `kdpipe quickstart` runs once per session and makes the folder that the examples of
  README and docs/cli.md work on; each document's commands run in a folder of their own,
  so the documents run in parallel under pytest-xdist.
"""

import functools
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from markdown_it import MarkdownIt
from PIL import Image

from .conftest import REPO, TIMM_NAME, TIMM_TAG, cli_json, fork_server, offline_env, put_timm_weights

MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
FORMAT_MD = REPO / "docs" / "format.md"


# --- every markdown file renders --------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def heading_anchors(tokens) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation other than `-` and
    `_` dropped, spaces as `-`, a repeated anchor suffixed -1, -2, ..."""
    anchors, seen = set(), {}
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def links(tokens):
    """(target, line) of every link and image in the rendered document."""
    for token in tokens:
        for child in token.children or ():
            target = child.attrGet("href") if child.type == "link_open" else child.attrGet("src") if child.type == "image" else None
            if target is not None:
                yield target, token.map[0] + 1


def fence_problems(path: Path, tokens, lines: list[str]) -> list[str]:
    """Fences that never close, and lines inside a fence that look like its closing fence
    with text after it (Markdown reads those as code, so the block runs on)."""
    problems = []
    for token in tokens:
        if token.type != "fence":
            continue
        start, end = token.map
        marker = FENCE.match(lines[start]).group(1)
        closing = lines[end - 1].strip()
        if end - start < 2 or not (closing.startswith(marker[0] * len(marker)) and set(closing) == {marker[0]}):
            problems.append(f"{path.name}:{start + 1}: the fence opened here is never closed")
        for number in range(start + 1, end - 1):
            inner = FENCE.match(lines[number])
            if inner and inner.group(1)[0] == marker[0] and len(inner.group(1)) >= len(marker):
                problems.append(f"{path.name}:{number + 1}: a fence line with text after it inside the "
                                f"block opened at line {start + 1}: {lines[number].strip()[:60]!r}")
    return problems


def test_every_markdown_file_renders_with_closed_fences_and_live_links():
    parser = MarkdownIt("commonmark").enable("table")
    documents = {path: parser.parse(path.read_text()) for path in MARKDOWN}
    anchors = {path.resolve(): heading_anchors(tokens) for path, tokens in documents.items()}
    problems = []
    for path, tokens in documents.items():
        problems += fence_problems(path, tokens, path.read_text().splitlines())
        for target, line in links(tokens):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path.resolve()
            if not resolved.exists():
                problems.append(f"{path.name}:{line}: {target}: no such file")
            elif anchor and resolved.suffix == ".md":
                known = anchors.get(resolved) or heading_anchors(parser.parse(resolved.read_text()))
                if anchor not in known:
                    problems.append(f"{path.name}:{line}: {target}: no heading has the anchor #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_markdown_check_finds_a_broken_fence_and_a_dead_anchor(tmp_path):
    """The check above can fail: the fault docs/format.md had is found."""
    parser = MarkdownIt("commonmark")
    text = "# Title\n\n```text\nsome output\n``` text after the fence\n\n## Later\n\n```\n"
    tokens = parser.parse(text)
    assert any("text after it" in p for p in fence_problems(tmp_path / "x.md", tokens, text.splitlines()))
    assert "later" not in heading_anchors(tokens)  # the heading became code
    text = "# Title\n\n```bash\nkdpipe inspect\n"
    problems = fence_problems(tmp_path / "x.md", parser.parse(text), text.splitlines())
    assert any("never closed" in p for p in problems)
    assert heading_anchors(parser.parse("## When `--out` already exists\n## A: b/c\n## A: b/c\n")) == {
        "when---out-already-exists", "a-bc", "a-bc-1"}


# --- docs/format.md's Python runs against real archives ------------------------------------

@functools.cache
def format_md() -> dict:
    """docs/format.md's ```python blocks, run in order in one namespace, as one file
    (their `if __name__ == "__main__":` parts do not run)."""
    namespace = {"__name__": "format_md"}
    for block in re.findall(r"```python\n(.*?)```", FORMAT_MD.read_text(), flags=re.S):
        exec(compile(block, str(FORMAT_MD), "exec"), namespace)
    return namespace


@pytest.fixture
def spec() -> dict:
    return format_md()

FEATURE_OUTPUTS = "logits,0=pool:3+pca:2+int8,1=fp32,3=pca:5+fp16,4=int8"

# name: (--data, extra cache-teacher options); synthetic images are 32 x 32
ARCHIVES = {
    "zarr-dense-fp16": ("synthetic:6:3", ["--shard-size", "4", "--color-jitter", "0.4"]),
    "zarr-dense-fp32": ("synthetic:6:3", ["--shard-size", "4", "--codec", "dense-fp32"]),
    "zarr-topk": ("synthetic:6:3", ["--shard-size", "4", "--codec", "topk:2"]),
    "zarr-dense-int8": ("synthetic:6:3", ["--shard-size", "4", "--codec", "dense-int8"]),
    "webdataset-dense-fp16": ("synthetic:6:3", ["--shard-size", "4", "--format", "webdataset"]),
    "webdataset-dense-fp32": ("synthetic:6:3", ["--shard-size", "4", "--format", "webdataset", "--codec", "dense-fp32"]),
    "webdataset-topk": ("synthetic:6:3", ["--shard-size", "4", "--format", "webdataset", "--codec", "topk:2"]),
    "zarr-one-sample": ("synthetic:1:3", []),
    "webdataset-one-sample": ("synthetic:1:3", ["--format", "webdataset"]),
    "zarr-one-class": ("synthetic:6:1", ["--codec", "topk:2"]),
    "webdataset-one-class": ("synthetic:6:1", ["--format", "webdataset"]),
    "zarr-cutmix": ("synthetic:6:3", ["--shard-size", "4", "--mixup", "cutmix"]),
    "webdataset-mixup": ("synthetic:6:3", ["--format", "webdataset", "--mixup", "mixup", "--mix-alpha", "0.5"]),
    "zarr-cutmix-randaugment-erase": ("synthetic:6:3", ["--mixup", "cutmix", "--randaugment", "3,9",
                                                        "--random-erase", "0.7"]),
    # schema 3: every feature codec step on the MLP's modules: 0 a 3 x 8 x 8 map (pooled to 3 x 3, so
    # the bins overlap, projected, int8 per view and channel), 1 and 3 vectors (fp32; pca + fp16), 4 int8 per view
    "zarr-features": ("synthetic:6:3", ["--shard-size", "4", "--outputs", FEATURE_OUTPUTS]),
    "webdataset-features": ("synthetic:6:3", ["--shard-size", "4", "--format", "webdataset", "--outputs",
                                              FEATURE_OUTPUTS]),
}
IMAGE_SIZE = (32, 32)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Build an archive of ARCHIVES by name, once per module."""
    built = {}

    def make(name: str) -> Path:
        if name not in built:
            data, options = ARCHIVES[name]
            out = tmp_path_factory.mktemp("archives") / name
            cli_json("cache-teacher", "--data", data, "--teacher", "kdpipe:mlp", "--out", out, "--epochs", "2",
                     "--views-per-sample", "2", "--size", "8", "--workers", "0", *options)
            built[name] = out
        return built[name]

    return make


def kdpipe_recipe(recipe: dict):
    from pipeline.config import ViewRecipe

    return ViewRecipe.from_dict(recipe)


@pytest.mark.parametrize("name", ARCHIVES)
def test_format_md_reader_and_rederivation_give_the_stored_views(spec, archive, name):
    """The spec's reader reads the archive, checksums and all, and the spec's re-derivation
    gives its sample_index and view_params exactly, as kdpipe's own view code does."""
    from pipeline import views

    root, manifest = spec["open_archive"](archive(name))
    spec["verify_checksums"](root, manifest)
    layout, recipe = manifest["layout"], manifest["recipe"]
    E, N, V, C = layout["epochs"], layout["num_samples"], layout["views_per_sample"], layout["num_classes"]
    ours = kdpipe_recipe(recipe)
    fields = views.view_param_fields(ours)
    assert list(fields) == layout["view_param_fields"]
    for epoch in range(E):
        slab = spec["read_slab"](root, manifest, epoch, 0, N)
        assert slab["logits"].shape == (N, V, C) and slab["logits"].dtype == np.float32
        assert np.isfinite(slab["logits"]).all()
        order = spec["epoch_order"](recipe, epoch, N)
        np.testing.assert_array_equal(slab["sample"], order)
        np.testing.assert_array_equal(order, views.epoch_order(ours, epoch, N))
        np.testing.assert_array_equal(slab["label"], order % C)  # synthetic labels are i % C
        pairs = spec["partners"](recipe, epoch, N) if recipe["mixup"] else None
        for position, index in enumerate(order.tolist()):
            for view in range(V):
                row = spec["sample_view"](recipe, epoch, index, view, IMAGE_SIZE)
                theirs = views.sample_view(ours, epoch, index, view, IMAGE_SIZE)
                if pairs is not None:
                    row = np.concatenate([row, spec["mix_params"](recipe, epoch, index, view, pairs[index])])
                    theirs = views.mix_view(ours, epoch, index, view, theirs, int(views.partners(ours, epoch, N)[index]))
                row = np.concatenate([row, spec["augment_params"](recipe, epoch, index, view)])
                stored = slab["view_params"][position, view]
                assert stored.tobytes() == row.tobytes(), (epoch, position, view, stored, row)
                assert theirs.as_array(fields).tobytes() == row.tobytes()
        if manifest["backend"] == "zarr" and manifest["schema_version"] == 1:  # the inverse permutation
            import zarr

            position_index = zarr.open_group(str(root), mode="r")["position_index"][epoch]
            np.testing.assert_array_equal(position_index[order], np.arange(N))


@pytest.mark.parametrize("name", ARCHIVES)
def test_format_md_reader_matches_kdpipes_reader(spec, archive, name, capsys):
    """Logits (decoded), view parameters, sample indices and (schema 3) decoded feature
    outputs equal, bit for bit, what kdpipe's ArchiveReader gives, over whole epochs and
    over a range that crosses shards."""
    from pipeline.store import ArchiveReader

    root, manifest = spec["open_archive"](archive(name))
    reader = ArchiveReader(root)
    N = manifest["layout"]["num_samples"]
    ranges = [(0, N)] + ([(3, 5)] if N > 4 else [])
    features = manifest.get("features", [])
    for epoch in range(manifest["layout"]["epochs"]):
        for start, stop in ranges:
            slab = spec["read_slab"](root, manifest, epoch, start, stop)
            logits, params, samples = reader.read(epoch, start, stop)
            assert slab["logits"].tobytes() == np.ascontiguousarray(logits, dtype=np.float32).tobytes()
            assert slab["view_params"].tobytes() == np.ascontiguousarray(params).tobytes()
            np.testing.assert_array_equal(slab["sample"], samples)
            assert sorted(slab["features"]) == sorted(feature["module"] for feature in features)
            fields = reader.read_fields(epoch, start, stop)
            for feature in features:
                module = feature["module"]
                theirs = np.ascontiguousarray(reader.decode_feature(module, fields))
                ours = slab["features"][module]
                pool = feature["codec"]["pool"] or feature["shape"][1:]
                assert ours.shape == theirs.shape == (stop - start, manifest["layout"]["views_per_sample"],
                                                      feature["shape"][0], *pool)
                assert ours.dtype == np.float32 and np.isfinite(ours).all()
                assert np.ascontiguousarray(ours).tobytes() == theirs.tobytes(), (module, epoch, start)
    if manifest["backend"] == "webdataset" and manifest["codec"]["name"].startswith("dense-"):
        records = list(spec["stream_records"](str(root)))  # stock webdataset, training order
        assert len(records) == manifest["layout"]["epochs"] * N
        first = spec["read_slab"](root, manifest, 0, 0, N)
        np.testing.assert_array_equal(np.stack([r["logits"] for r in records[:N]]).astype(np.float32), first["logits"])
    spec["main"](root)
    assert "checksums ok" in capsys.readouterr().out


def test_format_md_teacher_fingerprint_matches_the_manifest(spec, tmp_path):
    from pipeline.models import small_mlp

    torch.manual_seed(3)
    weights = tmp_path / "teacher.pt"
    torch.save(small_mlp(3).state_dict(), weights)
    out = tmp_path / "arch"
    cli_json("cache-teacher", "--data", "synthetic:4:3", "--teacher", "kdpipe:mlp", "--weights", weights,
             "--out", out, "--size", "8", "--workers", "0")
    teacher = json.loads((out / "manifest.json").read_text())["teacher"]
    assert spec["teacher_fingerprint"](weights, teacher) == teacher["fingerprint"]
    # an archive written before kdpipe recorded preprocessing: mean and std in the spec, the state-dict hash alone
    from pipeline.config import ModelSpec
    from pipeline.models import build_model, model_fingerprint

    older = {"spec": teacher["spec"] | {"mean": teacher["preprocessing"]["mean"], "std": teacher["preprocessing"]["std"]}}
    model = build_model(ModelSpec("kdpipe:mlp", 3, weights=str(weights)))
    assert spec["teacher_fingerprint"](weights, older) == model_fingerprint(model) != teacher["fingerprint"]


def resealed(spec: dict, manifest: dict, **changes) -> dict:
    """`manifest` with fields changed (dotted keys as `a__b`) and its fingerprint made valid again."""
    changed = json.loads(json.dumps(manifest))
    for key, value in changes.items():
        *parents, last = key.split("__")
        target = changed
        for parent in parents:
            target = target[parent]
        target[last] = value
    changed.pop("manifest_fingerprint")
    changed["manifest_fingerprint"] = spec["fingerprint"](changed)
    return changed


def test_format_md_reader_refuses_what_the_spec_says_a_reader_must(spec, archive):
    root = archive("zarr-dense-fp16")
    _, manifest = spec["open_archive"](root)
    refused = spec["Refused"]
    assert spec["check_manifest"](resealed(spec, manifest)) is None
    cases = {
        "schema_version": [True, 0, -3, "1", 1.0, 4],
        "backend": ["lance"],
        "total_bytes": [manifest["total_bytes"] + 1],
        "shards": [manifest["shards"][:-1]],
        "layout__num_classes": [4],
        "layout__view_param_fields": [manifest["layout"]["view_param_fields"][:7]],
        "layout__positions_per_chunk": [3],
        "codec__dtype": ["float32"],
        "codec__name": ["topk:x", "dense-bf16"],
    }
    for key, values in cases.items():
        for value in values:
            with pytest.raises(refused, match=key.split("__")[-1] if key != "codec__name" else "codec"):
                spec["check_manifest"](resealed(spec, manifest, **{key: value}))
    edited = dict(manifest, total_bytes=1)  # changed without re-sealing
    with pytest.raises(refused, match="manifest_fingerprint"):
        spec["check_manifest"](edited)
    # a chunk the manifest does not list is not read, even where zarr would read it
    stray = root / "sample_index" / "c" / "9" / "0"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    try:
        with pytest.raises(refused, match="not part of the archive"):
            spec["verify_checksums"](root, manifest)
    finally:
        stray.unlink()
        stray.parent.rmdir()


def test_format_md_reader_refuses_features_as_kdpipe_does(spec, archive):
    """The feature rules of docs/format.md: each broken one is refused by the spec's reader
    and by kdpipe's manifest parser alike; a schema-3 manifest without features is read."""
    from pipeline.store.manifest import Manifest, ManifestError

    _, manifest = spec["open_archive"](archive("zarr-features"))
    refused = spec["Refused"]
    features = manifest["features"]
    assert [feature["codec"]["name"] for feature in features] == ["pool:3x3+pca:2+int8", "fp32", "pca:5+fp16", "int8"]

    def changed(index, **codec):
        entry = json.loads(json.dumps(features[index]))
        entry["codec"].update({key: value for key, value in codec.items() if key != "shape"})
        entry["shape"] = codec.get("shape", entry["shape"])
        return features[:index] + [entry] + features[index + 1:]

    cases = [
        ({"schema_version": 2}, "features"),
        ({"features": changed(0, name="pool:3+pca:2+int8")}, "name"),  # not the canonical name
        ({"features": changed(0, name="pool:3x3+pca:2+fp16")}, "name"),  # contradicts dtype int8
        ({"features": changed(0, dtype="bfloat16")}, "dtype"),
        ({"features": changed(0, components=4, name="pool:3x3+pca:4+int8")}, "apply"),  # more components than channels
        ({"features": changed(0, pool=[9, 9], name="pool:9x9+pca:2+int8")}, "apply"),  # larger than the map
        ({"features": changed(1, pool=[1, 1], name="pool:1x1+fp32")}, "apply"),  # pooling a vector
        ({"features": changed(1, shape=[])}, "apply"),  # a scalar per view
        ({"features": changed(1, components=True, name="pca:True+fp32")}, "components"),
        ({"features": features + [features[1]]}, "twice|second"),
        ({"features": []}, "features"),
        ({"features": [features[0] | {"module": "a/b"}] + features[1:]}, "module|features\\[0\\]"),
        ({"features": changed(2, shape=[features[2]["shape"][0], 4])}, "apply"),  # pca of tokens by width
        ({"files": {k: v for k, v in manifest["files"].items() if not k.startswith("projections/")}}, "projection"),
    ]
    for change, problem in cases:
        broken = resealed(spec, manifest, **change)
        with pytest.raises(refused, match=problem):
            spec["check_manifest"](broken)
        with pytest.raises(ManifestError):
            Manifest.from_dict(broken)
    logits_only = {k: v for k, v in manifest.items() if k != "features"}
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(("feature", "projections/"))}
    shards = [shard | {"files": [key for key in shard["files"] if not key.startswith("feature")]}
              for shard in manifest["shards"]]
    logits_only = resealed(spec, logits_only, files=files, shards=shards,
                           total_bytes=sum(entry["bytes"] for entry in files.values()))
    assert logits_only["schema_version"] == 3 and spec["check_manifest"](logits_only) is None
    Manifest.from_dict(logits_only)


def test_format_md_feature_encoding_is_what_the_spec_says(archive):
    """docs/format.md's encoding steps, computed here from the MLP's module 0 (a 3 x 8 x 8
    map, stored whole as module 1, its flattening, with fp32), give exactly the stored
    pool:3x3+pca:2+int8 fields of module 0: the bins, the projection and the int8 rounding."""
    import zarr

    root = archive("zarr-features")
    group = zarr.open_group(str(root), mode="r")
    x = group["feature.1"][...].reshape(2, 6, 2, 3, 8, 8)  # (E, N, V, C, H, W) float32
    bins = [(i * 8 // 3, -(-(i + 1) * 8 // 3)) for i in range(3)]  # rows floor(i H / h) to ceil((i + 1) H / h) - 1
    assert bins == [(0, 3), (2, 6), (5, 8)]
    pooled = np.empty(x.shape[:-2] + (3, 3), dtype=np.float32)
    for i, (top, bottom) in enumerate(bins):
        for j, (left, right) in enumerate(bins):
            pooled[..., i, j] = x[..., top:bottom, left:right].mean(axis=(-2, -1), dtype=np.float64)
    projection = np.load(root / "projections" / "0.npy")
    mean, directions = projection[0], projection[1:]
    u = np.einsum("kc,nvc...->nvk...", directions, pooled.reshape(-1, 2, 3, 3, 3) - mean[:, None, None],
                  optimize=True).reshape(2, 6, 2, 2, 3, 3)
    low, high = u.min(axis=(-2, -1)), u.max(axis=(-2, -1))
    offset = (low / 2 + high / 2).astype(np.float16)
    reach = np.maximum(high - offset.astype(np.float32), offset.astype(np.float32) - low)
    wanted = np.maximum(reach / 127, np.float32(2.0**-14))
    scale = wanted.astype(np.float16)  # the smallest float16 >= wanted
    scale = np.where(scale.astype(np.float32) < wanted, np.nextafter(scale, np.float16(np.inf)), scale)
    steps = np.clip(np.rint((u - offset.astype(np.float32)[..., None, None]) / scale.astype(np.float32)[..., None, None]),
                    -127, 127).astype(np.int8)
    assert group["feature_offset.0"][...].tobytes() == offset.tobytes()
    assert group["feature_scale.0"][...].tobytes() == scale.tobytes()
    assert group["feature.0"][...].tobytes() == steps.tobytes()
    assert np.abs(steps).max() >= 126  # the steps span the range


def test_format_md_absent_chunks_are_what_the_spec_says(archive):
    """The chunks that docs/format.md says zarr leaves out are left out, and read as 0."""
    one_sample, one_class = archive("zarr-one-sample"), archive("zarr-one-class")
    files = json.loads((one_sample / "manifest.json").read_text())["files"]
    assert not any(key.startswith(("sample_index/c/", "position_index/c/", "labels/c/")) for key in files)
    assert not (one_sample / "sample_index" / "c").exists()
    files = json.loads((one_class / "manifest.json").read_text())["files"]
    assert "labels/c/0" not in files and not (one_class / "labels" / "c" / "0").exists()


# --- docs/cli.md's option reference is generated ---------------------------------------------

def test_cli_md_option_reference_is_generated_from_the_cli():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import cli_reference
    finally:
        sys.path.remove(str(REPO / "tools"))
    text = (REPO / "docs" / "cli.md").read_text()
    assert cli_reference.replace_reference(text) == text, (
        "docs/cli.md's option reference differs from the CLI's options: run python tools/cli_reference.py --write"
    )


# --- every bash block runs ---------------------------------------------------------------------

SKIP = re.compile(r"^\s*(python3? -m venv|\. \.venv|source |pip install|pytest)")


def bash_blocks(path: Path) -> list[str]:
    """The runnable lines of every ```bash block in a markdown file."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return ["\n".join(line for line in block.splitlines() if not SKIP.match(line)) for block in blocks]


@pytest.fixture(scope="session")
def shell_env() -> dict:
    """The environment the docs' blocks run in: `kdpipe` on PATH is the fork server's shim
    (see tests/forkserver.py), so each command is a process of its own that skips the imports."""
    shim_folder = fork_server().socket_path.parent
    path = os.pathsep.join([str(shim_folder), str(Path(sys.executable).parent), os.environ["PATH"]])
    return os.environ | {"PATH": path, "COLUMNS": "120"}


def on_the_quickstart(block: str) -> bool:
    """Whether a block works on the quickstart's folder (or on what such a block made)."""
    return "kdpipe-quickstart" in block or "docs-example/cli/" in block


def run_blocks(blocks: list[str], source: Path, cwd: Path, env: dict) -> None:
    """Run `blocks` of `source` in order in `cwd`, as written."""
    for block in blocks:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{source.name}:\n{block}\n--- stderr:\n{result.stderr[-3000:]}"


WALKTHROUGH = "# ImageNet walkthrough"


def run_elsewhere(block: str) -> bool:
    """Blocks another test runs as written: README's quickstart (the `quickstart` fixture
    here), its ImageNet walkthrough (on a stand-in, below), cli.md's tiny bench
    (tests/test_bench.py) and the detection quickstart (tests/test_detection.py, on
    fewer images and epochs)."""
    return block.strip() == "kdpipe quickstart" or block.startswith(("kdpipe bench ", WALKTHROUGH, DETECTION_QUICKSTART))


DETECTION_QUICKSTART = "kdpipe quickstart --task detection"


def runnable(source: Path, quickstart: bool) -> list[str]:
    """The blocks of `source` that work on the quickstart's folder, or the others."""
    return [block for block in bash_blocks(source)
            if block.strip() and not run_elsewhere(block) and on_the_quickstart(block) == quickstart]


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, shell_env) -> Path:
    """The folder README's `kdpipe quickstart` makes, made once for the whole session: the
    pytest-xdist workers share it through a lock in their common base folder."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "quickstart-run"
    with FileLock(str(shared / "quickstart-run.lock")):
        if not (folder / "kdpipe-quickstart" / "summary.json").exists():
            folder.mkdir(exist_ok=True)  # README gives this command: test_readme_gives_the_install_...
            result = subprocess.run(["bash", "-c", "kdpipe quickstart"], cwd=folder, env=shell_env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
    return folder / "kdpipe-quickstart"


@pytest.mark.slow
def test_readme_quickstart_does_what_readme_says(quickstart):
    summary = json.loads((quickstart / "summary.json").read_text())
    assert set(summary) >= {"teacher", "supervised", "online", "cached", "cache"}
    for mode in ("teacher", "supervised", "online", "cached"):
        assert {"val_top1", "wall_seconds", "views_per_sec"} <= set(summary[mode])
    assert summary["cache"]["bytes"] > 0 and summary["cache"]["bytes_per_view"] > 0
    # distillation is what lifts the student above its few labels
    assert summary["cached"]["val_top1"] > summary["supervised"]["val_top1"] + 5
    # the students' further figures: top-5, their EMA, and the distilled ones' agreement with the teacher
    for mode in ("supervised", "online", "cached"):
        assert summary[mode]["val_top5"] >= summary[mode]["val_top1"] and summary[mode]["val_top1_ema"] > 50
    assert summary["cached"]["val_agreement"] > 90 and summary["supervised"]["val_agreement"] is None
    # and its picture, which README shows (docs/quickstart.png)
    assert "| cached-seed0 |" in (quickstart / "report.md").read_text()
    assert Image.open(quickstart / "report.png").size[0] > 1000


def test_readme_gives_the_install_quickstart_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert any(re.search(r"^\s*pip install", block, flags=re.M) for block in blocks)
    assert any(block.strip() == "kdpipe quickstart" for block in blocks)
    assert any(re.search(r"^\s*pytest", block, flags=re.M) for block in blocks)


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
USES_QUICKSTART = [path for path in DOCUMENTS if runnable(path, quickstart=True)]
STANDALONE = [path for path in DOCUMENTS if runnable(path, quickstart=False)]


@pytest.mark.slow
@pytest.mark.parametrize("source", USES_QUICKSTART, ids=lambda path: path.name)
def test_commands_on_the_quickstart_folder_run(source, quickstart, shell_env, tmp_path):
    """The examples that work on the quickstart's folder, each document's in a folder of
    their own beside (a link to) that folder, as a user who ran the quickstart has it."""
    (tmp_path / "kdpipe-quickstart").symlink_to(quickstart, target_is_directory=True)
    run_blocks(runnable(source, quickstart=True), source, tmp_path, shell_env)


@pytest.mark.slow
@pytest.mark.parametrize("source", STANDALONE, ids=lambda path: path.name)
def test_commands_of_each_document_run(source, shell_env, tmp_path):
    """The other examples (on synthetic data), each document's in a folder of their own."""
    run_blocks(runnable(source, quickstart=False), source, tmp_path, shell_env)


# --- README's ImageNet walkthrough, on a stand-in ------------------------------------------

# timm's tiny models with published tags stand in for the walkthrough's (same library, same
# loading code, a fraction of the compute)
STAND_IN_MODELS = {"timm:resnet50.a1_in1k": f"timm:{TIMM_NAME}.{TIMM_TAG}", "timm:mobilenetv3_small_100": "timm:test_vit"}


def imagenet_stand_in(folder: Path, train: int = 96, val: int = 48, shards: int = 4) -> None:
    """ImageNet's layout in miniature, as the walkthrough describes it: training images in
    WebDataset shards (a .jpg and a .cls class index per sample), validation images in a
    flat folder with val.csv naming their WordNet ids, and the 1000 ids in classes.txt."""
    classes = timm.data.ImageNetInfo().label_names()
    folder.mkdir()
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)

    def jpeg(label: int) -> bytes:
        pixels = np.clip(rng.normal(40 + label % 200, 30, size=(int(rng.integers(24, 48)), 40, 3)), 0, 255)
        out = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    labels = rng.integers(0, 10, size=train + val)  # ten of the thousand classes
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:04d}.tar", "w") as tar:
            for i in range(shard * train // shards, (shard + 1) * train // shards):
                for name, data in ((f"n{i:08d}.jpg", jpeg(labels[i])), (f"n{i:08d}.cls", str(labels[i]).encode())):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    (folder / "val").mkdir()
    rows = ["path,label"]
    for i in range(val):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        (folder / "val" / name).write_bytes(jpeg(labels[train + i]))
        rows.append(f"val/{name},{classes[labels[train + i]]}")
    (folder / "val.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
def test_readme_imagenet_walkthrough_runs_on_a_stand_in(shell_env, tmp_path):
    """The walkthrough's commands as written, offline, with the teacher's published weights
    in a Hugging Face cache on tmp_path and STAND_IN_MODELS in place of the two models."""
    (block,) = [block for block in bash_blocks(REPO / "README.md") if block.startswith(WALKTHROUGH)]
    for model, stand_in in STAND_IN_MODELS.items():
        assert model in block
        block = block.replace(model, stand_in)
    imagenet_stand_in(tmp_path / "imagenet")
    env = shell_env | {key: value for key, value in offline_env(tmp_path).items() if key not in os.environ}
    put_timm_weights(env)
    run_blocks([block], REPO / "README.md", tmp_path, env)
    manifest = json.loads((tmp_path / "resnet50-in1k.zarr" / "manifest.json").read_text())
    own = timm.data.resolve_data_config(model=timm.create_model(f"{TIMM_NAME}.{TIMM_TAG}"))
    assert manifest["teacher"]["preprocessing"]["mean"] == list(own["mean"])
    assert manifest["recipe"]["size"] == own["input_size"][-1] and manifest["layout"]["num_classes"] == 1000
    summary = json.loads((tmp_path / "runs" / "mobilenetv3" / "summary.json").read_text())
    assert summary["epochs"] == 1 and len(summary["classes"]) == 1000 and summary["val_top1"] is not None
