"""The EMA follows ema = decay * ema + (1 - decay) * p, in float32, and copies integer buffers; under
FSDP2 each rank averages its own shard and the gathered result is the same formula on full tensors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run by torchrun (test_sharded_ema_...): make the package importable
    sys.path.insert(0, str(ROOT))

from stiv_core.training.ema import EMA  # noqa: E402


class Net(nn.Module):
    """Sizes that shard unevenly over 2 ranks: 3 rows -> 2 + 1; 1 row -> 1 + 0 (an empty shard)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.row = nn.Parameter(torch.randn(1, 5))
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
    full = ema.full_state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(full[k].double(), v, rtol=1e-6, atol=1e-6)
    assert int(full["count"]) == 5 and full["count"].dtype == torch.long
    assert not torch.allclose(full["lin.weight"], net.lin.weight)  # it lags behind


def test_ema_is_a_float32_shadow_not_a_view_of_the_model():
    net = Net().to(torch.bfloat16)
    ema = EMA(net, decay=0.9999)
    assert ema.shadow["lin.weight"].dtype == torch.float32 and ema.shadow["count"].dtype == torch.long
    before = ema.shadow["lin.weight"].clone()
    with torch.no_grad():
        net.lin.weight.add_(1.0)
    ema.update(net)
    # A 1e-4 step survives because the shadow is float32 (bf16 would round it away).
    torch.testing.assert_close(ema.shadow["lin.weight"] - before, torch.full_like(before, 1e-4), rtol=1e-2, atol=1e-7)


def test_full_state_round_trip_and_mismatch_errors():
    torch.manual_seed(0)
    saved = EMA(Net(), decay=0.9).full_state_dict()
    torch.manual_seed(1)
    ema = EMA(Net(), decay=0.9)
    ema.load_full_state_dict(saved)
    assert all(torch.equal(ema.full_state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="missing .*'row'"):
        ema.load_full_state_dict({k: v for k, v in saved.items() if k != "row"})
    with pytest.raises(ValueError, match="row: saved shape"):
        ema.load_full_state_dict({**saved, "row": torch.zeros(2, 5)})


@pytest.mark.slow  # a subprocess
def test_sharded_ema_averages_local_shards_and_gathers_the_full_formula():
    """Two processes over gloo, the Net sharded with FSDP2's fully_shard (the __main__ below)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("sharded EMA ok") == 2


def _sharded_check() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net()
    full = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    fully_shard(net, mesh=init_device_mesh("cpu", (2,)))
    ema = EMA(net, decay=0.9)
    shards = {"lin.weight": [(2, 4), (1, 4)], "lin.bias": [(2,), (1,)], "row": [(1, 5), (0, 5)]}
    for name, p in net.named_parameters():  # each rank keeps only its shard, in float32
        shadow = ema.shadow[name]
        assert isinstance(shadow, DTensor) and shadow.placements == p.placements and shadow.dtype == torch.float32
        assert tuple(shadow.to_local().shape) == tuple(p.to_local().shape) == shards[name][rank], name
    expected = {k: v.clone() for k, v in full.items()}
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        with torch.no_grad():
            for name, p in net.named_parameters():
                noise = torch.randn(p.shape, generator=g)  # the same full tensor on both ranks
                p.add_(distribute_tensor(noise, p.device_mesh, p.placements, src_data_rank=None))
                full[name] += noise.double()
            net.count += 1
        ema.update(net)
        expected = {k: 0.9 * expected[k] + 0.1 * full[k] for k in expected}
    gathered = ema.full_state_dict()
    if rank == 0:
        assert gathered.keys() == {*expected, "count"} and int(gathered["count"]) == 4
        for k, v in expected.items():
            torch.testing.assert_close(gathered[k].double(), v, rtol=1e-6, atol=1e-6)
    else:
        assert gathered == {}
    # a fresh EMA of the sharded model takes the full tensors back (every rank passes them)
    again = EMA(net, decay=0.9)
    given = {**{k: v.float() for k, v in expected.items()}, "count": torch.tensor(4)}
    again.load_full_state_dict(given)
    back = again.full_state_dict()
    assert back.keys() == (given.keys() if rank == 0 else set())
    assert all(torch.equal(back[k], given[k]) for k in back)
    dist.destroy_process_group()
    print("sharded EMA ok", flush=True)
    # Gloo worker threads can still be joinable when the interpreter finalises, and about 1 run in 15 on
    # 2 cores then dies with "terminate called without an active exception" (SIGABRT) after passing;
    # everything is checked and flushed, so leave without the finaliser.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _sharded_check()
