"""FSDP2 through accelerate, two CPU processes over gloo: the trainer's sharded path, on the CPU.

accelerate 1.15 turns FSDP on only for GPU-family devices (in `AcceleratorState`, a CPU run is
MULTI_CPU and `--use_fsdp` silently gives DDP), so these tests launch this file, whose `__main__`
switches the freshly built Accelerator to FSDP2 and runs the trainer. From `prepare()` on the code
is accelerate's and torch's own: `fsdp2_prepare_model` (fully_shard per STIVBlock and at the root
over a gloo mesh), the optimizer's parameter swap, DTensor gradient clipping. The same run on GPUs
is `accelerate launch --use_fsdp --fsdp_version 2 stiv_core/train.py ...` (the gpu-marked test).

References: an FSDP2 run matches a DDP run of the same data (two processes each) step for step, and
its checkpoints are full tensors that a single process loads, and back.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses / real training runs (CI runs them; -m 'not slow' skips)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["batch_size=2", "sample_every=0", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
        "model.text_dim=32", "model.pooled_text_dim=32", "model.maskdit_extra_blocks=1",
        "recipe.maskdit_ratio=0.5", "recipe.task_ti2v=1.0", "data.buckets=[[4, 16, 16]]", "log_every=1",
        "optim.warmup_steps=2", "optim.ema_decay=0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *overrides: str, fsdp: bool, processes: int = 2, cpu: bool = True) -> subprocess.CompletedProcess:
    script = str(Path(__file__).relative_to(ROOT)) if fsdp and cpu else "stiv_core/train.py"
    mode = ["--multi_gpu"] if cpu else ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
                                        "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "STIVBlock"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", script, "--config", "stiv_core/configs/tiny.toml", f'output_dir="{out}"',
           *TINY, *overrides]
    # --multi_gpu + ACCELERATE_USE_CPU: accelerate's way to start N gloo processes on a CPU-only machine
    # (`--cpu --num_processes 2` starts only one).
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "true"} if cpu else {})}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in ("model", "ema", "state"):
        for key, value in load_file(str(checkpoint / f"{name}.safetensors")).items():
            found[f"{name}/{key}"] = value
    return found


def assert_close_checkpoints(a: Path, b: Path) -> None:
    """Same keys and shapes; values equal up to the order of floating-point sums across ranks."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        x, y = ta[key].double(), tb[key].double()
        assert x.shape == y.shape, key
        if key.startswith("state/rng"):  # reseeded from (seed, step, rank) every step
            assert torch.equal(ta[key], tb[key]), key
            continue
        # AdaFactor's second moments are ~1e-30 where a gradient is ~0: compare against each tensor's size.
        assert (x - y).norm() <= 1e-4 * x.norm() + 1e-6, (key, (x - y).abs().max())


# ---- the state-dict functions, in one process ----

def test_fsdp1_is_refused_and_fsdp2_loads_no_model_through_accelerate():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from stiv_core.training.full_state import configure_sharding

    def accelerator(kind, fsdp2):
        plugin = SimpleNamespace(cpu_ram_efficient_loading=True)
        return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(fsdp_plugin=plugin))

    with pytest.raises(ValueError, match="--fsdp_version 2"):
        configure_sharding(accelerator(DistributedType.FSDP, False))
    fsdp2 = accelerator(DistributedType.FSDP, True)
    configure_sharding(fsdp2)
    assert fsdp2.state.fsdp_plugin.cpu_ram_efficient_loading is False  # (the launcher's default is True)
    ddp = accelerator(DistributedType.MULTI_CPU, False)
    configure_sharding(ddp)
    assert ddp.state.fsdp_plugin.cpu_ram_efficient_loading is True  # untouched


def test_optimizer_state_by_name_round_trips_and_invents_no_state():
    """torch.distributed.checkpoint first gives every parameter a state (a zero step); a parameter
    that had none (no gradient yet), or an optimizer that never stepped, must come back without."""
    from torch import nn

    from stiv_core.training.full_state import full_optimizer_state, load_full_optimizer_state
    from stiv_core.training.optim import AdaFactor

    def build():
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        return model, AdaFactor(model.parameters(), lr=0.1)

    torch.manual_seed(0)
    model, optimizer = build()
    empty = full_optimizer_state(model, optimizer)
    assert empty["state"] == {} and not optimizer.state  # no zero step was taken to make one
    assert empty["param_groups"][0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    fresh, fresh_optimizer = build()
    load_full_optimizer_state(fresh, fresh_optimizer, {**empty, "param_groups": [{**empty["param_groups"][0], "lr": 0.5}]})
    assert not fresh_optimizer.state and fresh_optimizer.param_groups[0]["lr"] == 0.5

    model[0](torch.randn(5, 3)).sum().backward()  # the second layer gets no gradient
    optimizer.step()
    saved = full_optimizer_state(model, optimizer)
    assert set(saved["state"]) == {"0.weight", "0.bias"}
    reference = optimizer.state_dict()["state"]  # torch's own, keyed by index
    assert torch.equal(saved["state"]["0.weight"]["row_var"], reference[0]["row_var"])
    fresh, fresh_optimizer = build()
    load_full_optimizer_state(fresh, fresh_optimizer, saved)
    loaded = fresh_optimizer.state_dict()["state"]
    assert set(loaded) == {0, 1}  # the second layer has no state, as in the saved run
    assert all(torch.equal(loaded[i][k], reference[i][k]) for i in (0, 1) for k in reference[i])


# ---- two processes ----

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A DDP run and an FSDP2 run of the same 3 steps (checkpoints at 2 and 3, samples at 3); the FSDP2
    run also recomputes activations (gradient checkpointing inside FSDP units), which changes no value."""
    root = tmp_path_factory.mktemp("fsdp")
    found = {}
    for kind in ("ddp", "fsdp"):
        extra = ["gradient_checkpointing=true"] if kind == "fsdp" else []
        done = launch(root / kind, "max_steps=3", "checkpoint_every=2", "resume=false", "sample_every=3",
                      "sample_steps=2", *extra, fsdp=kind == "fsdp")
        found[kind] = (root / kind, done.stderr)
    return found


def test_fsdp2_really_shards_and_matches_ddp(runs):
    (ddp, ddp_log), (fsdp, fsdp_log) = runs["ddp"], runs["fsdp"]
    assert "training on 2 process(es), DistributedType.MULTI_CPU" in ddp_log
    assert "training on 2 process(es), DistributedType.FSDP" in fsdp_log
    for step in (2, 3):
        assert_close_checkpoints(ddp / f"checkpoints/step_{step:08d}", fsdp / f"checkpoints/step_{step:08d}")
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (ddp, fsdp)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert sorted(p.name for p in (fsdp / "samples").iterdir()) == sorted(p.name for p in (ddp / "samples").iterdir())
    assert (fsdp / "samples/step_00000003_0.mp4").stat().st_size > 0  # from the gathered EMA, on rank 0
    # The EMA moved away from the weights (decay 0.5), so comparing it compares the sharded EMA.
    state = tensors(fsdp / "checkpoints/step_00000003")
    assert any(not torch.equal(state[k], state[k.replace("ema/", "model/", 1)]) for k in state if k.startswith("ema/"))


def test_fsdp2_checkpoint_is_full_and_loads_in_one_process(runs, tmp_path):
    from stiv_core.checkpoint import load_model
    from stiv_core.bundle import load_pipeline
    from stiv_core.train import train
    from stiv_core.training.config import load_config
    fsdp = runs["fsdp"][0]
    checkpoint = fsdp / "checkpoints/step_00000003"
    for name in ("model", "ema"):
        model = load_model(checkpoint / f"{name}.safetensors")
        full = load_file(str(checkpoint / f"{name}.safetensors"))
        assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    assert load_pipeline(fsdp / "model.safetensors").model.config.depth == 2  # the exported EMA bundle
    # a single process resumes the FSDP run's checkpoint and trains on
    shutil.copytree(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    config = load_config(ROOT / "stiv_core/configs/tiny.toml", TINY + [f"output_dir={tmp_path}", "max_steps=4"])
    result = train(config)
    assert result.step == 4 and len(result.losses) == 1 and (tmp_path / "checkpoints/step_00000004").is_dir()


def test_fsdp2_resumes_a_ddp_checkpoint_in_the_legacy_format(runs, tmp_path):
    """An FSDP2 run continues the DDP run's step-2 checkpoint, rewritten with its optimizer state keyed
    by index (the format before FSDP support), and reaches the DDP run's step 3."""
    from stiv_core.training.config import load_config
    from tests.legacy_checkpoint import rewrite_as_legacy
    ddp = runs["ddp"][0]
    legacy = tmp_path / "checkpoints/step_00000002"
    shutil.copytree(ddp / "checkpoints/step_00000002", legacy)
    rewrite_as_legacy(legacy, load_config(ROOT / "stiv_core/configs/tiny.toml", TINY + [f"output_dir={tmp_path}"]))
    done = launch(tmp_path, "max_steps=3", fsdp=True)
    assert "resumed from" in done.stderr and "DistributedType.FSDP" in done.stderr
    assert_close_checkpoints(ddp / "checkpoints/step_00000003", tmp_path / "checkpoints/step_00000003")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp2_on_gpus_trains_checkpoints_and_resumes(tmp_path):
    """The real launch: `accelerate launch --use_fsdp --fsdp_version 2` on every visible GPU."""
    from stiv_core.checkpoint import load_model
    gpus = torch.cuda.device_count()
    done = launch(tmp_path, "max_steps=3", "checkpoint_every=2", "resume=false", fsdp=True, processes=gpus, cpu=False)
    assert f"training on {gpus} process(es), DistributedType.FSDP" in done.stderr
    assert load_model(tmp_path / "checkpoints/step_00000003/ema.safetensors").config.depth == 2
    more = launch(tmp_path, "max_steps=4", fsdp=True, processes=gpus, cpu=False)
    assert "resumed from" in more.stderr and (tmp_path / "checkpoints/step_00000004").is_dir()


if __name__ == "__main__":  # one of the processes that `launch(..., fsdp=True)` starts on the CPU
    sys.path.insert(0, str(ROOT))
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    import stiv_core.train as trainer

    class CPUFSDP2Accelerator(Accelerator):
        """An Accelerator switched to FSDP2 after construction (see the module docstring), with the
        plugin settings `accelerate launch --use_fsdp --fsdp_version 2` gives (cpu_ram_efficient_loading
        is on there by default)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["STIVBlock"],
                cpu_ram_efficient_loading=True)

    trainer.Accelerator = CPUFSDP2Accelerator
    trainer.main(sys.argv[1:])
