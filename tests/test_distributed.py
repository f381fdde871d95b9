"""kdpipe under torchrun: 2 processes on the CPU with the gloo backend, against 1 process.

A 2-rank cache-teacher must write the very archive a 1-rank run writes, and a 2-rank
train-student with the same global batch must end within floating-point tolerance of
the 1-rank student (each rank takes a contiguous part of every batch; DDP averages).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelSpec
from pipeline.distributed import Ranks, check_batches
from pipeline.errors import ConfigError
from pipeline.models import Teacher, build_model

from .conftest import REPO, archive_files, cli_json, subprocess_env, weights, write_image_folder

CACHE = ["--teacher", "kdpipe:cnn", "--epochs", "2", "--views-per-sample", "2", "--size", "16", "--shard-size", "4",
         "--batch-size", "3", "--workers", "0"]
# 18 samples in batches of 5: parts of 3 and 2 samples per rank, and a last batch of 3
TRAIN = ["--student", "kdpipe:mlp", "--epochs", "2", "--batch-size", "5", "--workers", "1"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 kdpipe ARGS`, from the repository."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cli",
               *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=subprocess_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("ddp") / "data")


@pytest.mark.slow
def test_two_rank_cache_equals_one_rank_cache(data, tmp_path):
    """Ranks take the 10 (epoch, shard) units in turn; the archive is the same, file for file.
    (How units are shared does not depend on the backend: zarr stands for both.)"""
    cli_json("cache-teacher", "--data", data, "--out", tmp_path / "one", *CACHE)
    child = torchrun("cache-teacher", "--data", data, "--out", tmp_path / "two", *CACHE)
    assert child.returncode == 0, child.stderr
    summary = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and '"ranks": 2' in summary[0]  # rank 0 alone reports
    assert archive_files(tmp_path / "two") == archive_files(tmp_path / "one")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cached", "online"])
def test_two_rank_training_matches_one_rank(mode, data, tmp_path):
    """Same global batch, 1 rank against 2: the same losses per epoch and the same
    weights within float tolerance; rank 0 alone writes the run directory."""
    source = ["--cache", tmp_path / "archive"] if mode == "cached" else ["--teacher", "kdpipe:cnn", "--size", "16"]
    if mode == "cached":
        cli_json("cache-teacher", "--data", data, "--out", tmp_path / "archive", *CACHE)
    else:
        source += ["--teacher-batch-size", "4"]
    cli_json("train-student", "--data", data, "--out", tmp_path / "one", *TRAIN, *source)
    child = torchrun("train-student", "--data", data, "--out", tmp_path / "two", *TRAIN, *source)
    assert child.returncode == 0, child.stderr
    assert child.stderr.count("] epoch 2/2") == 1  # only rank 0 logs
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
    untrained = build_model(ModelSpec("kdpipe:mlp", num_classes=3)).net.state_dict()
    assert any(not torch.allclose(one[name], untrained[name]) for name in one)  # training moved them
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_batch_too_small_for_the_ranks_is_refused():
    """18 samples in batches of 17 leave a last batch of 1: one rank would have nothing.
    (train-student checks this before its run directory is made, on every rank alike.)"""
    with pytest.raises(ConfigError, match="with 2 ranks every batch needs at least 2 samples, but one has 1"):
        check_batches(17, 18, 2)
    with pytest.raises(ConfigError, match="but one has 1"):
        check_batches(1, 18, 2)
    check_batches(5, 18, 2)  # parts of 3 and 2, and a last batch of 3
    check_batches(1, 18, 1)


def test_ranks_split_a_batch_into_contiguous_parts():
    assert [list(range(7))[Ranks(rank, 3).part(7)] for rank in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [Ranks(rank, 2).part(1) for rank in range(2)] == [slice(0, 1), slice(1, 1)]


def test_teacher_batch_size_gives_the_same_logits():
    teacher = Teacher(ModelSpec("kdpipe:cnn", num_classes=4), size=16)
    views = torch.rand(10, 3, 16, 16)
    assert torch.allclose(teacher(views, batch_size=3), teacher(views), atol=1e-6)


def test_on_the_cpu_the_teacher_runs_224_px_views_in_chunks_of_8():
    """Chunks keep a CPU teacher's activations below glibc's mmap threshold (see
    CPU_CHUNK_PIXELS); the logits are those of one batch."""
    teacher = Teacher(ModelSpec("kdpipe:cnn", num_classes=4), size=224)
    seen = []
    teacher.model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    views = torch.rand(19, 3, 224, 224)
    chunked = teacher(views)
    assert seen == [8, 8, 3]
    assert torch.allclose(chunked, teacher(views, batch_size=19), atol=1e-5)
    assert seen[-1] == 19
    teacher(views, batch_size=10)  # --teacher-batch-size overrides the CPU chunk
    assert seen[-2:] == [10, 9]
