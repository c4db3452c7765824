"""recompute_bn_stats (precise BN) and adapt_bn (AdaBN)."""
import pytest
import torch
from torch import nn

import normlab
from normlab.tools import ChannelMoments, adapt_bn, recompute_bn_stats


def _model(impl):
    bn = nn.BatchNorm2d if impl == "torch" else normlab.BatchNorm2d
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn(4, momentum=0.3), nn.ReLU(),
                         nn.Conv2d(4, 5, 1), bn(5, momentum=None), nn.Flatten()).double()


def test_channel_moments_chan_merge_exact():
    torch.manual_seed(0)
    xs = [torch.randn(n, 3, 4, dtype=torch.float64) * 5 + 100 for n in (1, 4, 9)]
    mom = ChannelMoments()
    for x in xs:
        mom.update(x)
    allx = torch.cat(xs)
    v, m = torch.var_mean(allx, dim=(0, 2), correction=1)
    torch.testing.assert_close(mom.mean, m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mom.var(), v, rtol=1e-12, atol=1e-12)
    assert mom.n == 14 * 4


@pytest.mark.parametrize("impl", ["torch", "normlab"])
def test_recompute_equals_population_statistics_unequal_batches(impl):
    torch.manual_seed(1)
    model = _model(impl)
    batches = [(torch.randn(n, 3, 6, 6, dtype=torch.float64) * 2 + 1, torch.zeros(n)) for n in (3, 7, 11, 2)]
    model.eval()
    nbt = [model[1].num_batches_tracked.clone(), model[4].num_batches_tracked.clone()]
    recompute_bn_stats(model, batches, num_batches=3)
    # layer 1: the population of the conv outputs over the first three batches
    with torch.no_grad():
        z = model[0](torch.cat([b[0] for b in batches[:3]]))
        v, m = torch.var_mean(z, dim=(0, 2, 3), correction=1)
        torch.testing.assert_close(model[1].running_mean, m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model[1].running_var, v, rtol=1e-10, atol=1e-12)
        # layer 4: its inputs as produced batch by batch with layer 1 in training mode
        ref1 = nn.BatchNorm2d(4, affine=True, track_running_stats=False).double()
        ref1.load_state_dict({"weight": model[1].weight, "bias": model[1].bias})
        z4 = torch.cat([model[3](torch.relu(ref1(model[0](b[0])))) for b in batches[:3]])
        v, m = torch.var_mean(z4, dim=(0, 2, 3), correction=1)
        torch.testing.assert_close(model[4].running_mean, m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model[4].running_var, v, rtol=1e-10, atol=1e-12)
    # modes, momenta and counters restored
    assert not model.training and not model[1].training and not model[4].training
    assert model[1].momentum == 0.3 and model[4].momentum is None
    assert torch.equal(model[1].num_batches_tracked, nbt[0]) and torch.equal(model[4].num_batches_tracked, nbt[1])
    assert model.bn_stats_count == {"1": 3 * 16 + 7 * 16 + 11 * 16, "4": (3 + 7 + 11) * 16}


def test_recompute_on_train_mode_model_and_tensor_batches_and_switchnorm():
    model = nn.Sequential(normlab.SwitchNorm1d(3), normlab.GhostBatchNorm1d(3, 2), normlab.BatchRenorm1d(3))
    model.train()
    xs = [torch.randn(n, 3) * 3 + 2 for n in (5, 8)]
    recompute_bn_stats(model, iter(xs))
    allx = torch.cat(xs)
    torch.testing.assert_close(model[0].running_mean, allx.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].running_var, allx.var(0), rtol=1e-5, atol=1e-5)
    assert all(m.training for m in model)


def test_recompute_beats_moving_average_after_distribution_change():
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(2, momentum=0.1)
    for _ in range(5):  # too few steps for the moving average to converge from (0, 1)
        bn(torch.randn(16, 2) * 4 + 10)
    data = [torch.randn(16, 2) * 4 + 10 for _ in range(5)]
    recompute_bn_stats(bn, data)
    allx = torch.cat(data)
    torch.testing.assert_close(bn.running_mean, allx.mean(0), rtol=1e-5, atol=1e-5)


def test_adapt_bn_moves_to_target_domain_and_prior():
    torch.manual_seed(3)
    model = nn.Sequential(nn.BatchNorm1d(3)).eval()
    source_batches = [torch.randn(32, 3) for _ in range(4)]
    recompute_bn_stats(model, source_batches)
    src_mean = model[0].running_mean.clone()
    target = [(torch.randn(32, 3) * 2 + 5, torch.zeros(32)) for _ in range(4)]
    blended = adapt_bn(__import__("copy").deepcopy(model), target, prior=0.25)
    adapt_bn(model, target)
    tmean = torch.cat([t[0] for t in target]).mean(0)
    torch.testing.assert_close(model[0].running_mean, tmean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blended[0].running_mean, 0.25 * src_mean + 0.75 * tmean, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prior"):
        adapt_bn(model, target, prior=2.0)
