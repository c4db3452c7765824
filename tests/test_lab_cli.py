"""The lab's command line: --help everywhere, train on a tiny dataset, a tiny experiment and the report."""
import json

import pytest

from normlab.cli import main
from normlab.lab.data import write_synthetic


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["experiment", "--help"], ["report", "--help"],
                                  ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: normlab" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fmnist")
    write_synthetic(directory, n_train=200, n_test=60)
    return str(directory)


def test_train_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--norm", "bn", "--impl", "torch", "--epochs", "1", "--batch-size", "50",
            "--lr", "0.1", "--out", str(out), "--data-dir", tiny_dir, "--no-verify", "--threads", "1",
            "--no-progress"]
    assert main(argv) == 0
    assert "done: epoch 1" in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_train_command_reports_data_errors(tmp_path, capsys):
    code = main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"), "--impl", "torch"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "lacks train-images-idx3-ubyte" in err


def test_train_command_batch_size_one(tiny_dir, tmp_path, capsys):
    code = main(["train", "--model", "lenet", "--norm", "bn", "--impl", "torch", "--batch-size", "1", "--epochs",
                 "1", "--train-subset", "4", "--out", str(tmp_path / "r"), "--data-dir", tiny_dir, "--no-verify"])
    assert code == 1
    assert "cannot train at batch size 1" in capsys.readouterr().err


def test_experiment_and_report(tiny_dir, tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    assert main(["experiment", "d2l", "--quick", "--seeds", "1", "--out", str(runs), "--impl", "torch",
                 "--data-dir", tiny_dir, "--no-verify", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| BN from scratch |" in out and "0.273 / 0.899 / 0.807" in out
    assert (runs / "d2l-quick" / "d2l_curves.png").exists()
    assert main(["report", "--runs", str(runs), "--docs", str(docs)]) == 0
    page = (docs / "report.md").read_text()
    assert "Machine:" in page and "Quick forms" in page and "(d2l-d2l_curves.png)" in page
    assert (docs / "d2l-d2l_curves.png").exists()


@pytest.mark.parametrize("argv", [["experiment", "lr", "--budget", "1000"],
                                  ["experiment", "batch-size", "--budget", "0"]])
def test_experiment_budget_is_for_batch_size_only(argv, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert "--budget" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
