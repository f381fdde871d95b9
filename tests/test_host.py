"""The host allocator setting: freed activations are kept for reuse, not faulted in again."""

import subprocess
import sys

import pytest

from pipeline.host import keep_freed_memory

# Minor page faults per forward pass of a small conv net whose activations (4 x 32 x 224
# x 224 floats, 25 MB) are as big as a teacher's, in a fresh interpreter.
FAULTS_PER_PASS = """
import resource, sys, torch
from torch import nn
from pipeline.host import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1))
x = torch.rand(4, 3, 224, 224)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode():
    net(x), net(x)
    before = faults()
    for _ in range(4):
        net(x)
print(kept, (faults() - before) / 4)
"""


def _faults_per_pass(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_PASS, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the setting is glibc's; elsewhere keep_freed_memory() is a no-op")
def test_kept_memory_is_reused_instead_of_faulted_in_on_every_pass():
    kept, with_setting = _faults_per_pass("keep")
    _, without = _faults_per_pass("default")
    assert kept
    assert without > 5000  # each pass maps its activations afresh and faults them in
    assert with_setting < without / 4


def test_the_users_own_allocator_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=1")
    assert keep_freed_memory() is False
