"""The tools experiments (domain shift / AdaBN, precise BN, fold) end to end on a tiny synthetic dataset."""
import json

import pytest
import torch

from normlab.lab.data import load_fashion_mnist, write_synthetic
from normlab.lab.experiments import Context
from normlab.lab.experiments_tools import SHIFTS, exp_domain_shift, exp_fold, exp_precise_bn, shift_images


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fmnist")
    write_synthetic(directory, n_train=300, n_test=80)
    return load_fashion_mnist(directory, verify=False)


@pytest.fixture
def ctx(tiny_data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Context(quick=True, seeds=1, out=str(tmp_path / "runs"), impl="torch", log=lambda s: None,
                  _data=tiny_data)
    torch.set_num_threads(threads)


def _check_outputs(result, name):
    assert result["quick"] and result["name"] == name
    directory = result["dir"]
    assert directory.endswith(f"{name}-quick")
    summary = json.loads(open(f"{directory}/results.json").read())
    assert summary["plots"], "at least one plot"
    for png in summary["plots"]:
        with open(f"{directory}/{png}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(f"{directory}/table.md").read()
    assert text.startswith("## ") and "|---|" in text
    return summary


def _acc(cell: str) -> float:
    return float(cell.split(" ")[0])


def test_shifts_stay_in_pixel_range():
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(shift_images("inverted (1 - x)", x), 1 - x)
    for name in SHIFTS:
        y = shift_images(name, x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_domain_shift_quick(ctx):
    result = exp_domain_shift(ctx)
    _check_outputs(result, "domain-shift")
    acc = result["results"]["accuracy"]
    assert set(acc) == set(SHIFTS)
    for per in acc.values():
        for values in per.values():
            assert len(values) == 1 and 0.0 <= values[0] <= 1.0
    assert result["results"]["eval_half"] == 40
    flagged = result["results"]["doctor_flagged_total"]
    assert 0 <= flagged["source"] <= len(SHIFTS) and 0 <= flagged["adabn"] <= len(SHIFTS)
    assert "| inverted (1 - x) |" in result["table_md"] and "Li et al. 2016" in result["table_md"]


def test_precise_bn_quick(ctx):
    result = exp_precise_bn(ctx)
    _check_outputs(result, "precise-bn")
    acc = result["results"]
    assert set(acc) == {"0.1", "0.01", "None (cumulative)"}
    for per in acc.values():
        assert {"EMA", "k = 1", "k = 10", "batch stats"} <= set(per) and any(k.startswith("all (") for k in per)
        assert all(0.0 <= v[0] <= 1.0 for v in per.values())
    # the momentum only touches the running buffers: same seed, same weights, same precise statistics
    precise = {name: next(v for k, v in per.items() if k.startswith("all (")) for name, per in acc.items()}
    assert len({v[0] for v in precise.values()}) == 1
    assert len({per["batch stats"][0] for per in acc.values()}) == 1
    assert "Wu & Johnson 2021" in result["table_md"]


def test_fold_quick(ctx):
    result = exp_fold(ctx)
    _check_outputs(result, "fold")
    lenet, relu = result["results"]["lenet"], result["results"]["lenet-relu"]
    assert len(lenet["folded"]) == 4 and not lenet["kept"]
    assert lenet["max_abs_diff_test"] < 1e-4 and relu["max_abs_diff_test"] < 1e-4
    assert abs(lenet["acc_before"] - lenet["acc_after"]) <= 1 / 80 + 1e-9
    # BN after a max-pool folds into the conv before the pool unless a channel's scale is negative
    assert len(relu["folded"]) + len(relu["kept"]) == 2
    assert all("negative scale" in why for _, why in relu["kept"])
    for r in (lenet, relu):
        for b in ("b256", "b1"):
            assert r[b]["original_ms"] > 0 and r[b]["folded_ms"] > 0
    assert "| lenet | `1` (BatchNorm2d) | folded into `0` (Conv2d)" in result["table_md"]
    if relu["folded"]:  # lenet-relu: conv `0` -> max-pool `1` -> BN `2`
        assert "| lenet-relu | `2` (BatchNorm2d) | folded into `0` (Conv2d)" in result["table_md"]


def test_full_forms_run(tiny_data, tmp_path):
    """The full forms (one flag away) run too: on the tiny data they only train a few more epochs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = Context(quick=False, seeds=1, out=str(tmp_path / "runs"), impl="torch", log=lambda s: None,
                      _data=tiny_data)
        for exp, name in ((exp_domain_shift, "domain-shift"), (exp_precise_bn, "precise-bn"), (exp_fold, "fold")):
            result = exp(ctx)
            assert not result["quick"] and result["dir"].endswith(name)
            assert (tmp_path / "runs" / name / "table.md").exists()
    finally:
        torch.set_num_threads(threads)


def test_cli_lists_every_registered_experiment():
    from normlab.lab.cli import EXPERIMENT_NAMES
    from normlab.lab.experiments import EXPERIMENTS
    assert EXPERIMENT_NAMES == list(EXPERIMENTS)


def test_bn_paper_quick(ctx):
    """The BN paper's experiment: early and final accuracy columns, sigmoid-input percentiles, two plots."""
    from normlab.lab.experiments import exp_bn_paper
    result = exp_bn_paper(ctx)
    summary = _check_outputs(result, "bn-paper")
    assert len(summary["plots"]) == 2
    text = open(f"{result['dir']}/table.md").read()
    assert "test acc @ 250 steps" in text and "test acc @ 3,000 steps" in text
    for row in ("| with BN |", "| without BN |"):
        cells = [c.strip() for c in text.split(row)[1].split("\n")[0].split("|")]
        assert 0.0 <= _acc(cells[0]) <= 1.0 and 0.0 <= _acc(cells[1]) <= 1.0


def test_batch_size_with_budget(ctx):
    """Every norm at every (quick) batch size on --budget examples, and batch size 1's verdicts."""
    from dataclasses import replace

    from normlab.lab.experiments import exp_batch_size
    ctx = replace(ctx, budget=32)
    result = exp_batch_size(ctx)
    summary = _check_outputs(result, "batch-size")
    text = open(f"{result['dir']}/table.md").read()
    assert "budget `--budget 32`" in text and "fixed budget of 32 examples" in text
    assert "one pass over 32 examples" in text and "16 noisy steps" in text
    assert set(summary["results"]) == {"lenet-relu", "mlp"} and len(summary["plots"]) == 2
    assert set(summary["results"]["lenet-relu"]) == {"bn", "batchrenorm", "switchnorm", "gn", "ln", "in", "none"}
    assert set(summary["results"]["mlp"]) == {"bn", "batchrenorm", "switchnorm", "gn", "ln", "none"}
    for per_norm in summary["results"].values():
        for per_size in per_norm.values():
            assert list(per_size) == ["2", "8", "32", "128"]
            assert all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in per_size.values())
    assert "| mlp: BatchNorm |" in text and "| lenet-relu: InstanceNorm |" in text
    # a fully connected BN cannot normalize one example; a conv-only BN silently becomes instance norm
    assert "mlp (BN on fc features) stops with `" in text
    assert "lenet-relu (BN after conv layers only) trains" in text
