"""The EMA follows ema = decay * ema + (1 - decay) * p, in float32, and copies integer buffers."""
import torch
from torch import nn

from stiv_core.training.ema import EMA


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_matches_formula_over_steps():
    torch.manual_seed(0)
    net = Net()
    ema = EMA(net, decay=0.9)
    expected = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.count += 1
        ema.update(net)
        for k in expected:
            expected[k] = 0.9 * expected[k] + 0.1 * net.state_dict()[k].double()
    for k, v in expected.items():
        torch.testing.assert_close(ema.state_dict()[k].double(), v, rtol=1e-6, atol=1e-6)
    assert int(ema.model.count) == 5
    assert not torch.allclose(ema.model.lin.weight, net.lin.weight)  # it lags behind


def test_ema_is_a_frozen_float32_copy():
    net = Net().to(torch.bfloat16)
    ema = EMA(net, decay=0.9999)
    assert ema.model.lin.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in ema.model.parameters())
    before = ema.model.lin.weight.clone()
    with torch.no_grad():
        net.lin.weight.add_(1.0)
    ema.update(net)
    # A 1e-4 step survives because the shadow is float32 (bf16 would round it away).
    torch.testing.assert_close(ema.model.lin.weight - before, torch.full_like(before, 1e-4), rtol=1e-2, atol=1e-7)
