"""Checkpoints: bit-exact safetensors round trip, config in the metadata, clear refusals of bad files."""
from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import save_file

from stiv_core import checkpoint
from stiv_core.checkpoint import (CheckpointError, load_config, load_model, read_metadata, save_model,
                                  save_state_dict)


@pytest.fixture
def saved(tmp_path, make_model, tiny_config):
    """(path, model): a random tiny MaskDiT model (non-default config fields) saved to tmp_path."""
    model = make_model(tiny_config.replace(maskdit_extra_blocks=2, rope_position_scale=(1.0, 0.5, 0.5)))
    path = tmp_path / "model.safetensors"
    save_model(path, model, metadata={"note": "test"})
    return path, model


def plain_state(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_round_trip_is_bit_exact(saved, make_inputs):
    path, model = saved
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.config.name == model.config.name
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    inputs = make_inputs(loaded.config)
    assert torch.equal(loaded(**inputs), model(**inputs))
    assert read_metadata(path)["note"] == "test"


def test_no_temporary_file_is_left_behind(saved, tmp_path):
    path, model = saved
    save_model(path, model)                                               # overwrite in place
    assert os.listdir(tmp_path) == [path.name]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(saved, tmp_path, monkeypatch):
    path, model = saved
    before = path.read_bytes()

    def crash(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, model)
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == before


def test_caller_metadata_cannot_replace_the_stored_config(tmp_path, make_model, tiny_config):
    path = tmp_path / "m.safetensors"
    save_model(path, make_model(), metadata={"stiv_config": tiny_config.replace(depth=5).to_json()})
    assert load_config(path) == tiny_config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_in_another_dtype(saved, dtype, make_inputs):
    path, model = saved
    loaded = load_model(path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    torch.testing.assert_close(loaded.final_linear.weight, model.final_linear.weight.to(dtype), rtol=0, atol=0)
    out = loaded(**make_inputs(loaded.config))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_saved_in_half_precision_loads_in_half_precision(tmp_path, make_model):
    path = tmp_path / "half.safetensors"
    save_model(path, make_model(), dtype=torch.float16)
    assert {p.dtype for p in load_model(path).parameters()} == {torch.float16}


@pytest.mark.parametrize("changes, words", [
    (dict(depth=3), ["missing", "blocks.2."]),
    (dict(depth=1), ["unexpected", "blocks.1."]),
    (dict(hidden_size=64), ["wrong shape", "patch_embed.weight", "(32, 4, 2, 2, 2)", "(64, 4, 2, 2, 2)"]),
])
def test_loading_into_another_config_names_the_keys(tmp_path, make_model, tiny_config, changes, words):
    path = tmp_path / "m.safetensors"
    save_model(path, make_model())
    with pytest.raises(CheckpointError, match="does not match the model config") as err:
        load_model(path, config=tiny_config.replace(**changes))
    for word in words:
        assert word in str(err.value)


def test_renamed_and_reshaped_keys_are_named(tmp_path, make_model, tiny_config):
    state = plain_state(make_model())
    state["blocks.0.mlp.fc1.weight"] = state.pop("blocks.0.ffn.fc1.weight")
    state["final_linear.bias"] = state["final_linear.bias"][:-1].clone()
    path = tmp_path / "renamed.safetensors"
    save_state_dict(path, state, {"stiv_config": tiny_config.to_json()})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "missing (1): ['blocks.0.ffn.fc1.weight']" in message
    assert "unexpected (1): ['blocks.0.mlp.fc1.weight']" in message
    assert "final_linear.bias: file (31,) vs model (32,)" in message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_pickle_files_are_refused(tmp_path, make_model, tiny_config, legacy):
    path = tmp_path / "model.pt"
    torch.save(plain_state(make_model()), path, _use_new_zipfile_serialization=not legacy)
    for kwargs in ({}, {"config": tiny_config}):
        with pytest.raises(CheckpointError, match="pickle.*only .safetensors"):
            load_model(path, **kwargs)


@pytest.mark.parametrize("first", [b"\x80", b"PK"])
def test_a_safetensors_header_length_that_looks_like_pickle_still_loads(tmp_path, make_model, first):
    # the file starts with the header length (u64, little-endian): 0x80 for 1 header size in 32 (they
    # are multiples of 8), "PK" for 0x4B50 mod 65536. Such files are safetensors, not pickles.
    model = make_model()
    path = tmp_path / "model.safetensors"
    save_model(path, model, metadata={"pad": ""})
    length = int.from_bytes(path.read_bytes()[:8], "little")   # grows one for one with the padding
    modulus, target = (256, 0x80) if first == b"\x80" else (65536, 0x4B50)
    grow = (target - length) % modulus
    for pad in range(max(0, grow - 8), grow + 9):
        save_model(path, model, metadata={"pad": "x" * pad})
        if path.read_bytes()[:len(first)] == first:
            break
    else:
        pytest.fail("no padding gave that first byte")
    loaded = load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx"],
                         ids=["random", "empty", "bad-header"])
def test_files_that_are_not_safetensors_are_refused(tmp_path, tiny_config, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    for kwargs in ({}, {"config": tiny_config}):
        with pytest.raises(CheckpointError, match="not a safetensors file|unreadable safetensors header"):
            load_model(path, **kwargs)


def test_truncated_file_is_refused_even_with_a_config(saved, tiny_config):
    path, model = saved
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        load_model(path, config=model.config)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_safetensors_without_stiv_config_needs_an_explicit_config(tmp_path, make_model, tiny_config, make_inputs):
    model = make_model()
    path = tmp_path / "foreign.safetensors"
    save_file(plain_state(model), str(path))
    with pytest.raises(CheckpointError, match="no STIV config in its metadata"):
        load_model(path)
    loaded = load_model(path, config=tiny_config)
    inputs = make_inputs()
    assert torch.equal(loaded(**inputs), model(**inputs))


def test_invalid_stored_config_is_reported(tmp_path, make_model):
    path = tmp_path / "m.safetensors"
    bad_config = '{"depth": 2, "hidden_size": 30, "num_heads": 4}'
    save_state_dict(path, plain_state(make_model()), {"stiv_config": bad_config})
    with pytest.raises(CheckpointError, match="stored STIV config is invalid.*not divisible"):
        load_model(path)
