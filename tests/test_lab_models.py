"""Lab models: shapes for every model/norm/impl, the from-scratch BN against torch.nn, normlab vs torch.nn
step for step."""

import pytest
import torch
import torch.nn.functional as F

from normlab.lab import scratch
from normlab.lab.models import MODELS, NORMS, build_model, default_groups, make_norm, norm_layers


def _impls():
    impls = ["torch", "scratch"]
    try:
        import normlab.nn  # noqa: F401
        impls.append("normlab")
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("impl", _impls())
def test_shapes(model, impl):
    torch.manual_seed(0)
    norms = ["none", "bn", "ln"] if model == "rnn" else NORMS
    if impl == "scratch":
        norms = ["none", "bn"]
    for norm in norms:
        net = build_model(model, norm, impl=impl)
        assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
        net.eval()
        assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_placement_and_errors():
    before = build_model("lenet", "bn", impl="torch", placement="before")
    after = build_model("lenet", "bn", impl="torch", placement="after")
    assert isinstance(before[1], torch.nn.BatchNorm2d) and isinstance(before[2], torch.nn.Sigmoid)
    assert isinstance(after[1], torch.nn.Sigmoid) and isinstance(after[2], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="scratch provides batch norm only"):
        build_model("lenet", "gn", impl="scratch")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="placement"):
        build_model("lenet", placement="sideways")
    assert [default_groups(c) for c in (6, 16, 120, 84, 7)] == [3, 8, 8, 7, 1]
    assert len(norm_layers(build_model("lenet", "bn", impl="torch"))) == 4
    assert isinstance(make_norm("batchnorm", 4, conv=False, impl="torch"), torch.nn.BatchNorm1d)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 6, 6)])
def test_scratch_bn_matches_torch(momentum, shape):
    torch.manual_seed(0)
    ours, ref = scratch.BatchNorm(shape[1], momentum=momentum), (
        torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1], momentum=momentum)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64).float() * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(ref, key))
    ours.eval(), ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_scratch_bn_batch_of_one_raises():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        scratch.BatchNorm(3)(torch.randn(1, 3))


@pytest.mark.parametrize("model,norm", [("lenet", "bn"), ("mlp", "bn"), ("lenet", "gn"), ("lenet-relu", "ln"),
                                        ("lenet-relu", "in"), ("mlp", "ln")])
def test_normlab_layers_train_like_torch_nn(model, norm):
    pytest.importorskip("normlab.nn")
    torch.manual_seed(0)
    ref = build_model(model, norm, impl="torch")
    ours = build_model(model, norm, impl="normlab")
    ours.load_state_dict(ref.state_dict())  # same keys and shapes, as the design requires
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (ref, ours)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        losses = []
        for net, opt in zip((ref, ours), opts):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (k, a), (k2, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    ref.eval(), ours.eval()
    x = torch.rand(8, 1, 28, 28, generator=g)
    torch.testing.assert_close(ref(x), ours(x), rtol=1e-4, atol=1e-5)


def test_registry_norms_plug_in():
    normlab = pytest.importorskip("normlab")
    if not hasattr(normlab, "create_norm"):
        pytest.skip("normlab.create_norm not available")
    net = build_model("lenet", "batchrenorm", impl="torch")  # registry names always use normlab's layers
    assert type(net[1]).__module__.startswith("normlab") and net(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="foo"):
        build_model("lenet", "foo")
