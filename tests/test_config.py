"""STIVConfig: presets, parameter counts (Table 1), validation messages, JSON round trip."""
from __future__ import annotations

import dataclasses

import pytest

from stiv_core.config import PRESETS, STIVConfig, preset
from stiv_core.model.sizes import count_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    config = preset(name)
    assert config.name == name
    # Re-validating through the constructor must accept the preset unchanged.
    again = STIVConfig.from_dict(dataclasses.asdict(config))
    assert again == config and again.name == name


def test_m_preset_parameter_count_matches_paper():
    # Table 1: M is 46 blocks x 3072 wide, 8.7B parameters (MaskDiT extra blocks excluded).
    n = count_parameters(preset("M"))
    assert abs(n / 8.7e9 - 1) < 0.05, f"{n / 1e9:.3f}B"


def test_parameter_count_formula_on_tiny_config(tiny_config):
    # Per block: 3 attentions of 4 D^2 + 4 D (+ 2 RMSNorm weights of head_dim), FFN 2 D H + H + D,
    # and a (6, D) scale_shift_table. Each extra MaskDiT block adds exactly one block.
    d, hd, h = tiny_config.hidden_size, tiny_config.head_dim, tiny_config.mlp_hidden
    block = 3 * (4 * d * d + 4 * d + 2 * hd) + (2 * d * h + h + d) + 6 * d
    base = count_parameters(tiny_config)
    assert count_parameters(tiny_config.replace(maskdit_extra_blocks=2)) - base == 2 * block + d  # + mask token
    assert count_parameters(tiny_config.replace(depth=5)) - base == 3 * block


def test_json_round_trip_is_equal(tiny_config):
    config = tiny_config.replace(rope_position_scale=(1.0, 0.5, 0.25), maskdit_extra_blocks=2,
                                 prediction="data")
    restored = STIVConfig.from_json(config.to_json())
    assert restored == config
    assert restored.name == config.name  # name does not take part in ==, check it separately
    assert restored.rope_position_scale == (1.0, 0.5, 0.25)


@pytest.mark.parametrize("changes, words", [
    (dict(hidden_size=30, num_heads=4), ["hidden_size 30", "num_heads 4"]),
    (dict(temporal_patch=3), ["temporal_patch", "(1, 2, 4)", "3"]),
    (dict(hidden_size=24, num_heads=4), ["head_dim 6", "divisible by 4"]),
    (dict(depth=0), ["depth", "positive"]),
    (dict(rope_position_scale=(1.0, 0.0, 1.0)), ["rope_position_scale"]),
    (dict(prediction="noise"), ["prediction", "'noise'"]),
])
def test_bad_values_raise_naming_the_problem(tiny_config, changes, words):
    with pytest.raises(ValueError) as err:
        tiny_config.replace(**changes)
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown STIV preset 'XS'") as err:
        preset("XS")
    for name in PRESETS:
        assert repr(name) in str(err.value)


def test_unknown_fields_are_refused(tiny_config):
    with pytest.raises(ValueError, match="unknown STIVConfig fields.*'width'"):
        tiny_config.replace(width=64)
    with pytest.raises(ValueError, match="unknown STIVConfig fields.*'heads'"):
        STIVConfig.from_dict({"depth": 2, "hidden_size": 32, "num_heads": 2, "heads": 2})


def test_configs_are_frozen(tiny_config):
    with pytest.raises(AttributeError):
        tiny_config.depth = 3
