"""The sampler nodes on a CPU device plan the run against the free RAM before allocating anything, the way the
CLI does (one entry point, one verdict): a run that cannot fit is a node error naming the fix, not the
kernel's out-of-memory killer taking ComfyUI down. Inside the stand-in ComfyUI of test_nodes_comfy; the
free RAM is injected (no test reads this machine's)."""
from __future__ import annotations

import logging

import pytest

from tests.pack import SETTINGS, install_fake_comfy, load, node, pack_module, sample, text


_comfy = pack_module("nodes._comfy")
run = pack_module("nodes.run")
types = pack_module("nodes.types")
pack_ram = pack_module("stiv_core.memory.ram")
GiB = 2 ** 30


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    return install_fake_comfy(tmp_path, monkeypatch)[0]


def free_ram(monkeypatch, available: int | None, *, total: int = 16 * GiB) -> None:
    """What the RAM probe reads, for the nodes (the pack's copy of stiv_core) and the CLI (stiv_core)."""
    from stiv_core.memory import ram

    reading = (ram.HostRAM(total, available, "test") if available is not None
               else ram.HostRAM(None, None, "none", unknown="no /proc/meminfo and psutil is not installed"))
    for module in (ram, pack_ram):
        monkeypatch.setattr(module, "host_ram", lambda: reading)


def steps_run(calls) -> int:
    return len([c for c in calls if isinstance(c, tuple) and c[0] == "progress"])


def test_a_run_that_does_not_fit_the_free_ram_is_refused_before_it_allocates(comfyui, monkeypatch):
    model = load()
    shape = run.SamplingSettings(**SETTINGS).run_shape(8, 1)
    peak = run.needed_bytes(model, shape)
    weights = pack_module("stiv_core.model.sizes").tensor_bytes(model.pipeline.model)
    free_ram(monkeypatch, peak - weights - 4096)   # the weights are loaded already: short by 4 KiB
    with pytest.raises(types.STIVInputError) as err:
        sample(model, text(), frames=8)
    message = str(err.value)
    assert message.startswith("STIV Sampler: this run does not fit in the free RAM (sampling on the CPU)")
    assert "fewer frames or a smaller width/height" in message and "STIV Decode chunk_frames" in message
    assert "DOES NOT FIT" in message and "swap more blocks" not in message   # no swap advice on the CPU
    assert steps_run(comfyui) == 0   # refused before the first step
    free_ram(monkeypatch, peak - weights + 4096)
    assert sample(model, text(), frames=8)["samples"].shape == (1, 3, 8, 16, 16)
    assert steps_run(comfyui) == SETTINGS["steps"]


def test_the_issue_case_builtin_model_1024_frames_at_256px_is_refused_by_the_nodes_and_the_cli(
        comfyui, monkeypatch, tmp_path, capsys):
    from stiv_core import generate

    free_ram(monkeypatch, 8 * GiB)
    model = load("tiny (built-in)")
    for name, call in [("STIV Sampler", lambda: sample(model, text(), frames=1024, width=256, height=256)),
                       ("STIV Keyframe -> Interpolate", lambda: node("STIVKeyframeInterpolate")(
                           model, text(), keyframes=1024, keyframe_stride=1, **{**SETTINGS, "width": 256,
                                                                                  "height": 256}))]:
        with pytest.raises(types.STIVInputError, match=f"^{name}: this run does not fit in the free RAM"):
            call()
    assert steps_run(comfyui) == 0
    out = tmp_path / "x.mp4"
    args = ["--prompt", "a red circle", "--frames", "1024", "--width", "256", "--height", "256", "--out", str(out)]
    with pytest.raises(SystemExit) as exited:   # a user error: one line and exit status 2
        generate.main(args)
    assert exited.value.code == 2 and "DOES NOT FIT" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("margin,fits", [(-4096, False), (4096, True)])
def test_the_cli_and_the_nodes_decide_the_same_at_the_boundary(comfyui, monkeypatch, tmp_path, margin, fits):
    """The same run, the same free RAM: the same verdict from the CLI's apply_memory_options and the node."""
    from stiv_core import generate
    from stiv_core.model.sizes import tensor_bytes

    model = load("tiny (built-in)")
    shape = run.SamplingSettings(**{**SETTINGS, "width": 32, "height": 32}).run_shape(4, 1)
    peak, weights = run.needed_bytes(model, shape), tensor_bytes(model.pipeline.model)
    free_ram(monkeypatch, peak - weights + margin)
    args = ["--prompt", "a red circle", "--frames", "4", "--width", "32", "--height", "32", "--steps", "1",
            "--seed", "3", "--scale", "4.0", "--out", str(tmp_path / "x.gif")]
    try:
        status = generate.main(args)
    except SystemExit as exited:   # a user error (this one: the run does not fit) exits with status 2
        status = exited.code
    assert (status == 0) == fits
    try:
        sample(model, text(), frames=4, width=32, height=32, steps=1)
        node_fits = True
    except types.STIVInputError as err:
        assert "does not fit" in str(err)
        node_fits = False
    assert node_fits == fits


def test_unknown_free_ram_is_not_refused_and_says_why(comfyui, monkeypatch, caplog):
    free_ram(monkeypatch, None)
    model = load()
    with caplog.at_level(logging.WARNING):
        assert sample(model, text(), frames=8)["samples"].shape[2] == 8
    assert "not checked" in caplog.text and "psutil is not installed" in caplog.text


def test_the_cpu_allocator_running_out_is_a_node_error(comfyui, monkeypatch):
    """What torch's CPU allocator raises when a cap (ulimit, cgroup) is hit: a plain RuntimeError."""
    model = load()
    pipeline_type = type(model.pipeline)

    def out_of_memory(self, request, callback=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 27917287424 bytes.")

    monkeypatch.setattr(pipeline_type, "sample_latents", out_of_memory)
    with pytest.raises(types.STIVInputError, match="STIV Sampler: out of memory on the CPU.*lower the frames"):
        sample(model, text())
    monkeypatch.undo()
    free_ram(monkeypatch, 8 * GiB)
    assert sample(model, text())["samples"].shape == (1, 3, 4, 16, 16)
