"""The training recipe: warmup, label smoothing, EMA, gradient accumulation, the clip
norm, --config files, and what a run keeps of its scores (best epoch, agreement)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import ModelSpec, TrainSpec
from pipeline.objective import cross_entropy
from pipeline.optim import WeightAverage, lr_factor, make_scheduler, updates_per_epoch

from .conftest import assert_user_error, cli_json, run_cli, weights

DATA, VAL = "synthetic:32:4:16", "synthetic:16:4:16"


def _train(out, *extra, data=DATA):
    return cli_json("train-student", "--data", data, "--student", "kdpipe:mlp", "--out", out, "--mode", "supervised",
                    "--batch-size", 8, "--epochs", 2, "--size", 16, "--workers", 0, *extra)


def test_warmup_then_cosine_per_optimizer_step():
    spec = TrainSpec(data=DATA, student=ModelSpec("kdpipe:mlp"), out="x", mode="supervised", epochs=4, batch_size=8,
                     accumulate=2, warmup_epochs=1, lr=0.1)
    assert updates_per_epoch(spec, 40) == 3  # 5 batches: updates of 2, 2 and 1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    scheduler = make_scheduler(spec, optimizer, 40)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # linear warmup over the first epoch's 3 updates
    assert rates[3:] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 9)) for k in range(9)])
    assert lr_factor(0, 0, 10) == 1.0  # no warmup: the cosine from the first step


def test_label_smoothing_is_cross_entropy_on_smoothed_targets():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = F.one_hot(labels, 5) * 0.8 + 0.2 / 5
    expected = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(cross_entropy(logits, labels, smoothing=0.2), expected)
    partner, lam = torch.tensor([1, 2, 3, 4, 0, 1]), torch.rand(6)
    mixed = lam[:, None] * targets + (1 - lam[:, None]) * (F.one_hot(partner, 5) * 0.8 + 0.04)
    torch.testing.assert_close(cross_entropy(logits, labels, (partner, lam), 0.2),
                               -(mixed * F.log_softmax(logits, 1)).sum(1).mean())


def test_weight_average_follows_the_warmed_up_decay():
    model = torch.nn.BatchNorm1d(3)
    average = WeightAverage(model, decay=0.9)
    expected = model.weight.detach().clone()
    for t in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        model(torch.randn(4, 3))  # moves the running statistics and the batch counter
        average.update(model)
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * model.weight.detach()
    torch.testing.assert_close(average.model.weight, expected)
    assert int(average.model.num_batches_tracked) == 5 and not average.model.weight.requires_grad


def test_accumulated_batches_train_as_one_batch_of_their_size(tmp_path):
    """--batch-size 8 --accumulate 2 takes the steps of --batch-size 16 (up to float
    rounding; the MLP has no BatchNorm or dropout), and differs from --batch-size 8."""
    big = _train(tmp_path / "big", "--batch-size", 16, "--clip-norm", 0)
    small = _train(tmp_path / "accumulated", "--accumulate", 2, "--clip-norm", 0)
    plain = _train(tmp_path / "plain", "--clip-norm", 0)
    assert big["epochs"] == small["epochs"] == plain["epochs"] == 2
    a, b, c = (weights(tmp_path / name) for name in ("big", "accumulated", "plain"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["2.weight"], c["2.weight"], atol=1e-4)


def test_recipe_options_change_the_run_they_name(tmp_path):
    """Each option reaches the step: clipping the gradient norm, label smoothing and
    warmup each give other weights than the defaults; --ema scores and saves an EMA."""
    base = weights(tmp_path / "base") if _train(tmp_path / "base", "--val", VAL) else None
    for name, option in {"clip": ("--clip-norm", 1e-3), "smooth": ("--label-smoothing", 0.3),
                         "warmup": ("--warmup-epochs", 1)}.items():
        _train(tmp_path / name, *option)
        assert not torch.equal(weights(tmp_path / name)["2.weight"], base["2.weight"]), name
    summary = _train(tmp_path / "ema", "--val", VAL, "--ema", 0.5)
    assert torch.equal(weights(tmp_path / "ema")["2.weight"], base["2.weight"])  # the EMA leaves training alone
    ema = torch.load(tmp_path / "ema" / "student_ema.pt", weights_only=True)
    assert not torch.equal(ema["model"]["2.weight"], base["2.weight"]) and ema["classes"] == summary["classes"]
    lines = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["val_top1_ema"] is not None and "val_top5_ema" in line for line in lines)
    assert summary["val_top1_ema"] == lines[-1]["val_top1_ema"]


def test_best_epoch_is_kept_beside_the_last(tmp_path):
    summary = _train(tmp_path / "run", "--val", VAL, "--epochs", 4, "--lr", 0.05)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(range(4), key=lambda i: (lines[i]["val_top1"], -i))
    assert summary["best_epoch"] == best + 1 and summary["best_val_top1"] == lines[best]["val_top1"]
    assert set(summary["val_per_class"]) == set(summary["classes"])
    result = run_cli("eval", "--model", "kdpipe:mlp", "--weights", tmp_path / "run" / "student_best.pt", "--data", VAL,
                     "--size", 16, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["top1"] == summary["best_val_top1"]


def test_config_file_sets_options_and_the_command_line_overrides_it(tmp_path):
    (tmp_path / "c.toml").write_text(f'data = "{DATA}"\nstudent = "kdpipe:mlp"\nmode = "supervised"\n'
                                     'batch-size = 8\n"--epochs" = 3\nsize = 16\nworkers = 0\nlr = 0.01\n'
                                     'mean = [0.5, 0.5, 0.5]\n')
    summary = cli_json("train-student", "--config", tmp_path / "c.toml", "--out", tmp_path / "run", "--epochs", 2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["epochs"] == config["epochs"] == 2 and config["lr"] == 0.01 and config["batch_size"] == 8
    assert config["student"]["mean"] == [0.5, 0.5, 0.5]
    # the saved options are a --config (YAML) that runs the same thing again
    options = yaml.safe_load((tmp_path / "run" / "options.yaml").read_text())
    assert options["epochs"] == 2 and options["lr"] == 0.01 and "config" not in options
    options["out"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(options))
    cli_json("train-student", "--config", tmp_path / "again.yaml")
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "run").values(),
                                                 weights(tmp_path / "again").values()))


@pytest.mark.parametrize("text, expected", [
    ("btach-size = 3\n", "'btach-size' is not an option of kdpipe train-student; did you mean batch-size"),
    ("learning_rate = 3\n", "'learning_rate' is not an option"),
    ("lr = [\n", "is not valid TOML"),
])
def test_bad_config_file_is_one_line(tmp_path, text, expected):
    (tmp_path / "c.toml").write_text(text)
    assert_user_error(run_cli("train-student", "--config", tmp_path / "c.toml", "--data", DATA, "--student",
                              "kdpipe:mlp", "--out", tmp_path / "run"), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, expected", [
    (("--warmup-epochs", 2), "--warmup-epochs 2 must be fewer than --epochs 2"),
    (("--accumulate", 0), "--accumulate must be a finite number >= 1"),
    (("--ema", 1), "--ema must be a finite number >= 0 and < 1"),
    (("--clip-norm", -1), "--clip-norm must be a finite number >= 0"),
    (("--mode", "online", "--teacher", "kdpipe:cnn", "--label-smoothing", 0.1), "--label-smoothing smooths"),
])
def test_bad_recipe_options_are_one_line(tmp_path, options, expected):
    command = ["train-student", "--data", DATA, "--student", "kdpipe:mlp", "--out", tmp_path / "run", "--epochs", 2,
               "--workers", 0, *options]
    assert_user_error(run_cli(*command), expected)


def test_a_run_started_before_an_option_existed_resumes(tmp_path):
    """config.json of an older kdpipe lacks the options added since (the training
    recipe's, RandAugment and erasing in the recipe): resuming it with a newer kdpipe
    compares them as their defaults, which that run used, rather than refusing it."""
    out = tmp_path / "run"
    _train(out, "--epochs", 3)
    (out / "student.pt").unlink()
    (out / "summary.json").unlink()
    config = json.loads((out / "config.json").read_text())
    for key in ("warmup_epochs", "label_smoothing", "ema", "accumulate", "clip_norm"):
        del config[key]
    for key in ("randaugment", "random_erase"):
        config["recipe"].pop(key, None)
    (out / "config.json").write_text(json.dumps(config))
    _train(out, "--epochs", 3, "--resume")
    assert (out / "summary.json").exists()
    assert_user_error(run_cli("train-student", "--data", DATA, "--student", "kdpipe:mlp", "--out", tmp_path / "run",
                              "--mode", "supervised", "--batch-size", 8, "--epochs", 3, "--size", 16, "--workers", 0,
                              "--resume"), "already holds a finished run")
