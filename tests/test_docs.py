"""The commands in README.md and docs/ run as written (the install and test commands aside).

README's commands run first, in a fresh folder, so its `kdpipe quickstart` makes the
folder that the examples in README and docs/ work on; then every ```bash block of
README.md and docs/*.md runs in order.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

SKIP = re.compile(r"^\s*(python3? -m venv|\. \.venv|source |pip install|pytest)")


def bash_blocks(path: Path) -> list[str]:
    """The runnable lines of every ```bash block in a markdown file."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return ["\n".join(line for line in block.splitlines() if not SKIP.match(line)) for block in blocks]


def test_readme_and_docs_commands_run(tmp_path):
    readme = bash_blocks(REPO / "README.md")
    assert any("kdpipe quickstart" in block for block in readme)
    assert any(re.search(r"^\s*pytest", block, flags=re.M) for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S))
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "120"}
    sources = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    for source in sources:
        for block in bash_blocks(source):
            if not block.strip():
                continue
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{source.name}:\n{block}\n--- stderr:\n{result.stderr[-3000:]}"
    # the quickstart did what README says it does
    summary = json.loads((tmp_path / "kdpipe-quickstart" / "summary.json").read_text())
    assert set(summary) >= {"teacher", "supervised", "online", "cached", "cache"}
    for mode in ("teacher", "supervised", "online", "cached"):
        assert {"val_top1", "wall_seconds", "views_per_sec"} <= set(summary[mode])
    assert summary["cache"]["bytes"] > 0 and summary["cache"]["bytes_per_view"] > 0
    # distillation is what lifts the student above its few labels
    assert summary["cached"]["val_top1"] > summary["supervised"]["val_top1"] + 5
