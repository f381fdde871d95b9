"""Shared helpers: real image folders on disk, CLI runs, and error checks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app

REPO = Path(__file__).resolve().parents[1]
MODES = ("L", "RGB", "RGBA", "P")


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 6, seed: int = 0,
    labelled: bool = True,
) -> Path:
    """A real image folder: PNG and JPEG, grayscale/RGB/RGBA/palette, assorted sizes.
    Each class has its own mean colour so that a model can learn something."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(14, 40, size=2))
            base = np.array([60 + 70 * c, 200 - 60 * c, 90 + 30 * (c % 2)], dtype=float)
            pixels = np.clip(base + rng.normal(0, 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert(MODES[(c + i) % len(MODES)])
            suffix = ".jpg" if i % 3 == 2 and image.mode in ("L", "RGB") else ".png"
            image.save(folder / f"{name}_{i:03d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


def archive_files(root: Path) -> dict[str, bytes]:
    """Every file below `root` (hidden ones included: a leftover temporary file counts)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args):
    """Run kdpipe in-process, as a user would from the shell."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_json(*args) -> dict:
    """Run a command that must succeed; its last stdout line is JSON."""
    result = run_cli(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_user_error(result, *fragments: str, after_epochs: bool = False) -> None:
    """Exit 2, one line on stderr that starts with 'error:' and names the problem, no traceback.
    With `after_epochs`, the error may follow the status lines of epochs already trained."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    if after_epochs:
        assert all("] epoch " in line for line in lines[:-1]), result.stderr
        lines = lines[-1:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def subprocess_env() -> dict:
    """Environment for running kdpipe in a child process that can import `tests`."""
    return os.environ | {"PYTHONPATH": str(REPO)}


KDPIPE = [sys.executable, "-m", "cli"]
