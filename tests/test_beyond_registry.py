"""create_norm / register_norm / list_norms."""
import pytest
import torch

import normlab
from normlab.registry import divisor_groups


@pytest.mark.parametrize("name,cls", [("batchnorm", "BatchNorm2d"), ("bn", "BatchNorm2d"), ("gn", "GroupNorm"),
                                      ("ln", "GroupNorm"), ("in", "InstanceNorm2d"), ("sn", "SwitchNorm2d"),
                                      ("brn", "BatchRenorm2d"), ("gbn", "GhostBatchNorm2d"),
                                      ("fbn", "FrozenBatchNorm2d"), ("Batch_Norm", "BatchNorm2d")])
def test_names_and_aliases(name, cls):
    m = normlab.create_norm(name, 8)
    assert type(m).__name__ == cls and type(m).__module__.startswith("normlab")
    y = m(torch.randn(4, 8, 3, 3))
    assert y.shape == (4, 8, 3, 3)


@pytest.mark.parametrize("dim,shape", [(1, (4, 6, 5)), (2, (4, 6, 3, 3)), (3, (4, 6, 2, 2, 2))])
@pytest.mark.parametrize("name", ["bn", "in", "sn", "brn", "gbn", "fbn"])
def test_dim(dim, shape, name):
    m = normlab.create_norm(name, 6, dim=dim)
    assert type(m).__name__.endswith(f"{dim}d")
    assert m(torch.randn(shape)).shape == shape


def test_impl_torch_and_kwargs():
    m = normlab.create_norm("bn", 5, dim=1, impl="torch", momentum=0.3, eps=1e-3)
    assert type(m) is torch.nn.BatchNorm1d and m.momentum == 0.3 and m.eps == 1e-3
    assert type(normlab.create_norm("gn", 64, impl="torch")) is torch.nn.GroupNorm
    assert type(normlab.create_norm("in", 5, impl="torch")) is torch.nn.InstanceNorm2d
    assert normlab.create_norm("in", 5).affine  # affine on by default in the registry
    with pytest.raises(ValueError, match="no torch.nn implementation"):
        normlab.create_norm("sn", 4, impl="torch")
    with pytest.raises(ValueError, match="impl"):
        normlab.create_norm("bn", 4, impl="jax")
    with pytest.raises(ValueError, match="dim"):
        normlab.create_norm("bn", 4, dim=4)
    gbn = normlab.create_norm("gbn", 4, virtual_batch_size=8)
    assert gbn.virtual_batch_size == 8


def test_groups_clipped_to_divisor():
    assert normlab.create_norm("gn", 64).num_groups == 32
    assert normlab.create_norm("gn", 48).num_groups == 24
    assert normlab.create_norm("gn", 6, groups=4).num_groups == 3
    assert normlab.create_norm("gn", 7).num_groups == 7
    assert normlab.create_norm("gn", 12, num_groups=5).num_groups == 4
    assert divisor_groups(10, 32) == 10 and divisor_groups(13, 4) == 1


def test_layernorm_channels_first_equals_layernorm_over_chw():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    ln = normlab.create_norm("ln", 4, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(x, (4, 5, 5))
    torch.testing.assert_close(ln(x), ref, rtol=1e-10, atol=1e-10)


def test_none_and_errors_and_register():
    assert isinstance(normlab.create_norm("none", 3, momentum=0.1), torch.nn.Identity)
    with pytest.raises(ValueError) as e:
        normlab.create_norm("batchnrom", 3)
    msg = str(e.value)
    assert "'batchnrom'" in msg and "Did you mean 'batchnorm'" in msg and "groupnorm (gn)" in msg
    names = normlab.list_norms()
    assert {"batchnorm", "groupnorm", "layernorm", "instancenorm", "switchnorm", "batchrenorm",
            "ghostbatchnorm", "frozenbatchnorm", "none"} <= set(names)
    normlab.register_norm("scaledbn_test", lambda c, dim=2, impl="normlab", **kw: torch.nn.BatchNorm2d(c, **kw),
                          aliases=("sbt",))
    assert isinstance(normlab.create_norm("sbt", 3), torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="already registered"):
        normlab.register_norm("bn", lambda c, **kw: None)
