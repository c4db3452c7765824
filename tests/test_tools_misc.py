"""freeze_bn / unfreeze_bn, convert, doctor."""
import copy
import pickle

import pytest
import torch
from torch import nn

import normlab
from normlab.tools import convert, doctor, freeze_bn, recompute_bn_stats, unfreeze_bn


def _net(bn=nn.BatchNorm2d, bias=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), bn(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


# ------------------------------------------------------------------------------------------------------------
# freeze
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn", [nn.BatchNorm2d, normlab.BatchNorm2d, normlab.BatchRenorm2d])
def test_freeze_keeps_running_stats_even_after_train(bn):
    model = _net(bn)
    model(torch.randn(16, 3, 8, 8) * 2 + 1)
    freeze_bn(model)
    model.train()
    rm, rv, nbt = model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked.clone()
    x = torch.randn(4, 3, 8, 8) + 5
    y = model(x)
    assert torch.equal(model[1].running_mean, rm) and torch.equal(model[1].running_var, rv)
    assert torch.equal(model[1].num_batches_tracked, nbt)
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[0].weight.requires_grad
    ev = copy.deepcopy(model).eval()
    torch.testing.assert_close(y, ev(x))
    y.sum().backward()  # gradients still flow to the rest of the model
    assert model[0].weight.grad is not None and model[1].weight.grad is None
    unfreeze_bn(model)
    assert model[1].weight.requires_grad and model[1].training
    model(x)
    assert not torch.equal(model[1].running_mean, rm)


def test_freeze_twice_unfreeze_once_and_deepcopy():
    model = _net()
    model[1].bias.requires_grad_(False)
    freeze_bn(freeze_bn(model))
    clone = copy.deepcopy(model)
    clone.train()
    rm = clone[1].running_mean.clone()
    clone(torch.randn(4, 3, 8, 8))
    assert torch.equal(clone[1].running_mean, rm)
    unfreeze_bn(model)
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad  # restores what it was
    assert len(clone[1]._forward_pre_hooks) == 1  # the copy stays frozen
    for other in (clone, pickle.loads(pickle.dumps(clone))):
        unfreeze_bn(other)
        other.train()
        other(torch.randn(4, 3, 8, 8))
        assert not torch.equal(other[1].running_mean, rm)


# ------------------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------------------
def test_convert_torch_normlab_round_trip():
    model = nn.Sequential(_net(), nn.LayerNorm(4), nn.Unflatten(1, (2, 2)), nn.GroupNorm(1, 2),
                          nn.InstanceNorm1d(2, affine=True))
    model[0](torch.randn(16, 3, 8, 8))
    nl = convert(model, "normlab")
    kinds = {type(m).__module__.split(".")[0] for m in nl.modules()
             if type(m).__name__ in ("BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm1d")}
    assert kinds == {"normlab"} and len(nl.convert_report) == 4
    x = torch.randn(5, 3, 8, 8)
    model.eval(), nl.eval()
    torch.testing.assert_close(nl(x), model(x), rtol=1e-5, atol=1e-5)
    back = convert(nl, "torch")
    assert type(back[0][1]) is nn.BatchNorm2d and type(back[1]) is nn.LayerNorm
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert type(model[0][1]) is nn.BatchNorm2d  # input untouched


def test_convert_between_norm_types_keeps_what_carries_over():
    model = _net()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.normal_()
    model(torch.randn(16, 3, 8, 8))
    model[1].eps = 1e-3
    gn = convert(model, "gn", groups=4)
    assert isinstance(gn[1], normlab.GroupNorm) and gn[1].num_groups == 4 and gn[1].eps == 1e-3
    torch.testing.assert_close(gn[1].weight, model[1].weight)
    fz = convert(model.eval(), "frozenbatchnorm")
    assert isinstance(fz[1], normlab.FrozenBatchNorm2d)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(fz(x), model(x))
    brn = convert(model, "brn", warmup_steps=10)
    torch.testing.assert_close(brn[1].running_var, model[1].running_var)
    assert brn[1].warmup_steps == 10 and int(brn[1].num_batches_tracked) == 1
    torch.testing.assert_close(brn(x), model(x))
    assert isinstance(convert(model, "none")[1], nn.Identity)
    with pytest.raises(ValueError, match="unknown norm 'gorupnorm'"):
        convert(model, "gorupnorm")


# ------------------------------------------------------------------------------------------------------------
# doctor
# ------------------------------------------------------------------------------------------------------------
def _healthy():
    model = _net()
    data = [torch.randn(32, 3, 8, 8) for _ in range(4)]
    for x in data:
        model(x)
    recompute_bn_stats(model, data)
    return model.eval()


def test_doctor_healthy_model_is_ok():
    model = _healthy()
    report = doctor(model, torch.randn(64, 3, 8, 8))
    assert report.ok, str(report)
    assert "no problems found" in str(report) and report.num_norms == 1


def test_doctor_finds_each_problem():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 4), nn.BatchNorm1d(4))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    report = doctor(model.train(), torch.randn(4, 3, 8, 8))
    codes = report.codes()
    assert {"bias-before-bn", "small-batch", "frozen-affine-updating-stats", "bn-at-output"} <= codes
    assert [f.module for f in report.by_code("bias-before-bn")] == ["0", "4"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    text = str(report)
    assert "WARNING bias-before-bn [0]" in text and "fix:" in text

    report = doctor(model.eval(), torch.randn(4, 3, 8, 8))
    assert {f.module for f in report.by_code("never-updated")} == {"1", "5"}

    report = doctor(model.train(), torch.randn(1, 3, 1, 1).expand(1, 3, 3, 3).contiguous())
    assert any(f.level == "error" for f in report.by_code("small-batch"))

    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    assert doctor(model.eval(), torch.randn(8, 3, 8, 8)).by_code("non-finite")[0].module == "1"


def test_doctor_train_eval_mismatch_and_frozen_ok():
    model = _healthy()
    report = doctor(model, torch.randn(64, 3, 8, 8) * 3 + 4)  # shifted domain
    (finding,) = report.by_code("train-eval-mismatch")
    assert "1 (mean off by" in finding.message and report.output_rel_diff > 0.1
    freeze_bn(model)
    model.train()
    assert "frozen-affine-updating-stats" not in doctor(model, torch.randn(64, 3, 8, 8)).codes()
    gbn = nn.Sequential(normlab.GhostBatchNorm1d(3, 2)).train()
    assert "virtual batches of 2" in doctor(gbn, torch.randn(32, 3, 4)).by_code("small-batch")[0].message
