"""`kdpipe bench` end to end, on tiny models: every case measured, the ratios derived
from them, the best of the repeats kept; each case in a fresh interpreter."""

import json
import os
import pickle
import re
import shlex

import pytest

from pipeline import bench as bench_module
from pipeline.bench import CASES, CEILINGS, TARGETS, format_bench

from .conftest import REPO, assert_user_error, run_cli

def documented_command() -> list[str]:
    """docs/cli.md's tiny `kdpipe bench` example, as arguments (its output redirection and
    --workdir aside): this file runs it, so that the docs' test need not run it again."""
    block = next(block for block in re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "cli.md").read_text(), re.S)
                 if block.startswith("kdpipe bench "))
    words = shlex.split(block.replace("\\\n", " ").splitlines()[0])
    words = words[2:words.index(">")]
    at = words.index("--workdir")
    return words[:at] + words[at + 2:]


DOCUMENTED = documented_command()
TINY = DOCUMENTED[:DOCUMENTED.index("--repeats")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """docs/cli.md's tiny bench run (two repeats): its folder and its JSON report. Its
    cases run in this process: what the report holds does not depend on where they ran,
    and a fresh interpreter for each (what `_fresh` gives a real run) is
    test_each_case_runs_in_a_fresh_interpreter's."""
    workdir = tmp_path_factory.mktemp("bench")
    assert DOCUMENTED == [*TINY, "--repeats", "2", "--json"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_module, "_fresh", lambda function, *args: function(*args))
        result = run_cli("bench", *DOCUMENTED, "--workdir", workdir)
    assert result.exit_code == 0, result.output
    return workdir, json.loads(result.stdout)


def steady(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["views_per_sec"]


def test_bench_json_reports_every_case_and_its_ratios(bench):
    workdir, report = bench
    speeds, ratios = report["views_per_sec"], report["ratios"]
    assert set(speeds) == set(CASES) and all(v > 0 for v in speeds.values())
    assert ratios["cached/supervised"] == pytest.approx(speeds["cached"] / speeds["supervised"])
    assert ratios["cached/online"] == pytest.approx(speeds["cached"] / speeds["online"])
    ideal = (1 / speeds["teacher"] + 1 / speeds["supervised"]) / (1 / speeds["supervised"])
    assert ratios["ideal cached/online"] == pytest.approx(ideal)
    assert ratios["cache_teacher/teacher"] == pytest.approx(speeds["cache_teacher"] / speeds["teacher"])
    assert ratios["cached (V views) / supervised (1 view)"] == pytest.approx(speeds["cached"] / speeds["supervised_1view"])
    assert ratios["content check / cached"] == pytest.approx(speeds["cached"] / speeds["content_check"])
    assert set(report["targets"]) == set(TARGETS) | set(CEILINGS)
    for name, target in report["targets"].items():
        met = ratios[name] >= target["target"] if name in TARGETS else ratios[name] <= target["ceiling"]
        assert target["met"] == met
    assert report["setup"]["views_per_sample"] == 2 and report["setup"]["device"] == "cpu"
    # what it measured is kept in --workdir: the images, finished archives, the runs
    assert len(list((workdir / "images").rglob("*.jpg"))) == 24
    assert (workdir / "archive-1" / "manifest.json").exists()
    cached = [json.loads(line) for line in (workdir / "cached-0" / "metrics.jsonl").read_text().splitlines()]
    assert len(cached) == 2 and "kd" in cached[0]


def test_one_view_per_decode_trains_on_as_many_views_in_steps_of_as_many(bench):
    workdir, _ = bench
    one_view = (workdir / "supervised_1view-0" / "metrics.jsonl").read_text().splitlines()
    assert len(one_view) == 4  # V = 2 times the epochs
    config = json.loads((workdir / "supervised_1view-0" / "config.json").read_text())
    assert config["recipe"]["views_per_sample"] == 1 and config["recipe"]["epochs"] == 4
    assert config["batch_size"] == 16  # V = 2 times the batch


def test_repeats_keep_the_best_of_each_case(bench):
    workdir, report = bench
    for case in ("supervised", "cached", "online"):
        assert report["views_per_sec"][case] == pytest.approx(max(steady(workdir / f"{case}-{r}") for r in (0, 1)))


def test_text_report_names_each_case_and_target(bench):
    text = format_bench(bench[1])
    for description in CASES.values():
        assert description in text
    assert text.count("(target >= ") == len(TARGETS) and text.count("(target <= ") == len(CEILINGS)


def test_bench_refuses_empty_sizes():
    assert_user_error(run_cli("bench", *TINY, "--samples", 0), "at least 1")


@pytest.mark.slow
def test_each_case_runs_in_a_fresh_interpreter(tmp_path):
    """A bench case runs in a new Python interpreter and its result comes back; the child's
    side pickles an exception instead, which the parent raises (checked in this process:
    each new interpreter costs seconds of imports)."""
    assert bench_module._fresh(os.getpid) != os.getpid()
    call, result = tmp_path / "call.pickle", tmp_path / "result.pickle"
    call.write_bytes(pickle.dumps((int, ("not a number",))))
    bench_module._call_pickled(str(call), str(result))
    ok, value = pickle.loads(result.read_bytes())
    assert not ok and isinstance(value, ValueError) and "invalid literal" in str(value)
