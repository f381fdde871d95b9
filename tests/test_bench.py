"""`kdpipe bench` end to end, on tiny models: every case measured, the ratios derived from them."""

import json

import pytest

from pipeline.bench import CASES, TARGETS

from .conftest import assert_user_error, run_cli

TINY = ["--teacher", "kdpipe:cnn", "--student", "kdpipe:mlp", "--samples", 24, "--classes", 3, "--image-size", 40,
        "--size", 16, "--views-per-sample", 2, "--epochs", 2, "--batch-size", 8, "--workers", 0]


def test_bench_json_reports_every_case_and_its_ratios(tmp_path):
    result = run_cli("bench", *TINY, "--workdir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    speeds, ratios = report["views_per_sec"], report["ratios"]
    assert set(speeds) == set(CASES) and all(v > 0 for v in speeds.values())
    assert ratios["cached/supervised"] == pytest.approx(speeds["cached"] / speeds["supervised"])
    assert ratios["cached/online"] == pytest.approx(speeds["cached"] / speeds["online"])
    ideal = (1 / speeds["teacher"] + 1 / speeds["supervised"]) / (1 / speeds["supervised"])
    assert ratios["ideal cached/online"] == pytest.approx(ideal)
    assert ratios["cache_teacher/teacher"] == pytest.approx(speeds["cache_teacher"] / speeds["teacher"])
    assert ratios["cached (V views) / supervised (1 view)"] == pytest.approx(speeds["cached"] / speeds["supervised_1view"])
    assert set(report["targets"]) == set(TARGETS)
    for name, target in report["targets"].items():
        assert target["met"] == (ratios[name] >= target["target"])
    assert report["setup"]["views_per_sample"] == 2 and report["setup"]["device"] == "cpu"
    # what it measured is kept in --workdir: the images, a finished archive, the runs
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 24
    assert (tmp_path / "archive-0" / "manifest.json").exists()
    cached = [json.loads(line) for line in (tmp_path / "cached-0" / "metrics.jsonl").read_text().splitlines()]
    assert len(cached) == 2 and "kd" in cached[0]
    # one view per decode: V times the epochs and the batch, so both cases train on as
    # many views in steps of as many views
    one_view = [json.loads(line) for line in (tmp_path / "supervised_1view-0" / "metrics.jsonl").read_text().splitlines()]
    assert len(one_view) == 4
    config = json.loads((tmp_path / "supervised_1view-0" / "config.json").read_text())
    assert config["recipe"]["views_per_sample"] == 1 and config["recipe"]["epochs"] == 4
    assert config["batch_size"] == 16


def test_bench_repeats_take_the_best_of_each_case(tmp_path):
    result = run_cli("bench", *TINY, "--repeats", 2, "--workdir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["views_per_sec"]
    for case in ("supervised", "cached", "online"):
        runs = [tmp_path / f"{case}-{repeat}" / "metrics.jsonl" for repeat in (0, 1)]
        steady = [json.loads(path.read_text().splitlines()[-1])["views_per_sec"] for path in runs]
        assert best[case] == pytest.approx(max(steady))


def test_bench_text_report_names_each_case_and_target():
    result = run_cli("bench", *TINY)
    assert result.exit_code == 0, result.output
    for text in CASES.values():
        assert text in result.stdout
    assert result.stdout.count("(target >= ") == len(TARGETS)


def test_bench_refuses_empty_sizes():
    assert_user_error(run_cli("bench", *TINY, "--samples", 0), "at least 1")
