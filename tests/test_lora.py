"""LoRA as a module swap: zero-init changes nothing, strength 0 is the base bit for bit, adapters stack,
merge equals the unmerged output, a quantized base keeps it on the fly, the file format round-trips and a
LoRA for another model is refused naming its keys."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from stiv_core import generate
from stiv_core.checkpoint import CheckpointError
from stiv_core.lora import (DEFAULT_TARGETS, LoRAConfig, LoRALinear, attach_lora, load_lora, lora_modules,
                            merge_lora, save_lora, set_strength, unmerge_lora)
from stiv_core.memory.quant import QuantConfig, QuantMode, fp8_format_for, quantize_blocks


def train_like(model, name, seed=1, std=0.05):
    """Seeded A and non-zero B matrices, as after training (a new adapter's B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model, name):
            adapter = module.adapter(name)
            for factor in (adapter.lora_A, adapter.lora_B):
                factor.weight.copy_(torch.randn(factor.weight.shape, generator=g) * std)


def test_a_new_lora_changes_nothing_and_wraps_every_attention_and_ffn_linear(make_model, make_inputs):
    model, inputs = make_model(), make_inputs()
    base = model(**inputs)
    paths = attach_lora(model, "a", LoRAConfig(rank=4))
    assert len(paths) == len(model.all_blocks()) * len(DEFAULT_TARGETS)
    assert all(isinstance(m, LoRALinear) for _, m in lora_modules(model))
    assert torch.equal(model(**inputs), base)  # B is zero-initialised


def test_strength_zero_is_the_base_bit_for_bit_and_adapters_stack(make_model, make_inputs):
    model, inputs = make_model(), make_inputs()
    base = model(**inputs)
    attach_lora(model, "a", LoRAConfig(rank=4))
    attach_lora(model, "b", LoRAConfig(rank=2, alpha=4.0))
    train_like(model, "a", seed=1), train_like(model, "b", seed=2)
    both = model(**inputs)
    assert not torch.allclose(both, base, atol=1e-4)
    set_strength(model, "a", 0.0), set_strength(model, "b", 0.0)
    assert torch.equal(model(**inputs), base)
    set_strength(model, "a", 1.0)
    only_a = model(**inputs)
    set_strength(model, "b", 1.0)
    assert not torch.allclose(model(**inputs), only_a, atol=1e-5)  # b adds on top of a
    with pytest.raises(ValueError, match="already has a LoRA named 'a'"):
        attach_lora(model, "a")


def test_a_merged_lora_gives_the_unmerged_output_and_unmerges(make_model, make_inputs):
    model, inputs = make_model(), make_inputs()
    attach_lora(model, "a", LoRAConfig(rank=4))
    train_like(model, "a")
    set_strength(model, "a", 0.7)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("base.weight")}
    unmerged = model(**inputs)
    assert merge_lora(model, "a") == len(before)
    torch.testing.assert_close(model(**inputs), unmerged, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unmerge it"):
        set_strength(model, "a", 1.0)
    assert unmerge_lora(model, "a") == len(before)
    for key, weight in model.state_dict().items():
        if key in before:
            torch.testing.assert_close(weight, before[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(**inputs), unmerged, atol=1e-5, rtol=1e-4)


def test_on_a_quantized_base_the_lora_applies_on_the_fly(make_model, make_inputs):
    model, inputs = make_model(), make_inputs()
    quantize_blocks(model, QuantConfig(QuantMode.FP8, fp8_format=fp8_format_for("cpu")[0]))
    base = model(**inputs)
    attach_lora(model, "a", LoRAConfig(rank=4))
    train_like(model, "a")
    assert merge_lora(model, "a") == 0          # nothing to merge into: fp8 storage
    assert not torch.allclose(model(**inputs), base, atol=1e-4)
    set_strength(model, "a", 0.0)
    assert torch.equal(model(**inputs), base)


def test_the_file_round_trips_in_the_peft_key_convention(make_model, make_inputs, tmp_path):
    model, inputs = make_model(), make_inputs()
    attach_lora(model, "style", LoRAConfig(rank=4, alpha=8.0, targets=("*.cross_attn.*",)))
    train_like(model, "style")
    expected = model(**inputs)
    save_lora(tmp_path / "style.safetensors", model, "style")
    with safe_open(str(tmp_path / "style.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        assert "blocks.0.cross_attn.q.lora_A.weight" in keys and "blocks.0.cross_attn.q.lora_B.weight" in keys
        assert all(".cross_attn." in k for k in keys) and "stiv_lora" in f.metadata()
    fresh = make_model()
    assert load_lora(tmp_path / "style.safetensors", fresh) == "style"
    torch.testing.assert_close(fresh(**inputs), expected)


def test_a_lora_for_another_model_is_refused_naming_its_keys(make_model, tmp_path):
    small = make_model()
    attach_lora(small, "a", LoRAConfig(rank=4))
    save_lora(tmp_path / "a.safetensors", small, "a")
    wide = make_model(hidden_size=64, num_heads=4)
    with pytest.raises(CheckpointError, match=r"LoRA for another model .*blocks\.0\..*lora_A\.weight"):
        load_lora(tmp_path / "a.safetensors", wide)
    assert not list(lora_modules(wide))  # nothing half-attached


@pytest.mark.parametrize("call,match", [
    (lambda m: attach_lora(m, "a", LoRAConfig(targets=("*.nothing",))), "match no Linear"),
    (lambda m: attach_lora(m, "a", strength=float("nan")), "finite"),
    (lambda m: LoRAConfig(rank=0), "rank"),
    (lambda m: LoRAConfig(alpha=-1.0), "alpha"),
])
def test_bad_lora_inputs_say_what_is_allowed(make_model, call, match):
    with pytest.raises(ValueError, match=match):
        call(make_model())


def test_a_file_that_is_not_a_lora_is_refused(make_model, tmp_path):
    from stiv_core.checkpoint import save_model

    model = make_model()
    save_model(tmp_path / "model.safetensors", model)
    with pytest.raises(CheckpointError, match="not a STIV LoRA"):
        load_lora(tmp_path / "model.safetensors", model)


def test_a_lora_attached_before_quantization_wraps_the_quantized_base_and_stays_full_precision(make_model,
                                                                                                make_inputs):
    """Against the float32 model with the same LoRA, the fp8 one is off by its weights' rounding only: no more
    than the fp8 model without a LoRA is off from the float32 one."""
    inputs = make_inputs()
    quant = QuantConfig(QuantMode.FP8, fp8_format=fp8_format_for("cpu")[0])
    quantized = make_model()
    quantize_blocks(quantized, quant)
    plain_error = (make_model()(**inputs) - quantized(**inputs)).abs().max()
    reference, model = make_model(), make_model()
    for m in (reference, model):
        attach_lora(m, "a", LoRAConfig(rank=4))
        train_like(m, "a")
    quantize_blocks(model, quant)
    for _, module in lora_modules(model):
        assert type(module.base).__name__ != "Linear"                       # the base was quantized
        assert module.adapter("a").lora_A.weight.dtype == torch.float32    # the LoRA was not
    lora_error = (model(**inputs) - reference(**inputs)).abs().max()
    assert 0 < lora_error < 1.5 * plain_error


def test_the_lora_swaps_with_its_block(make_model, make_inputs):
    from stiv_core.memory.swap import BlockSwapper

    reference, model, inputs = make_model(depth=3), make_model(depth=3), make_inputs()
    for m in (reference, model):
        attach_lora(m, "a", LoRAConfig(rank=4))
        train_like(m, "a")
    expected = reference(**inputs)
    BlockSwapper(model, 2, device=torch.device("cpu")).attach()
    assert torch.equal(model(**inputs), expected)


def test_only_a_trainable_lora_requires_grad(make_model):
    model = make_model()
    attach_lora(model, "frozen", LoRAConfig(rank=2))
    attach_lora(model, "train", LoRAConfig(rank=2), trainable=True)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".adapters.lora_train." in n for n in grads)


@pytest.fixture
def bundle_and_lora(tmp_path):
    from stiv_core.bundle import SamplingDefaults, save_bundle
    from stiv_core.config import preset
    from stiv_core.encoders.words import WordTextEncoder
    from stiv_core.model.transformer import STIVTransformer
    from tests.fakes import randomize

    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=32, pooled_text_dim=32, max_text_tokens=8)
    torch.manual_seed(0)
    model = randomize(STIVTransformer(config)).eval()
    words = WordTextEncoder(["a", "red", "circle"], dim=32, max_tokens=8)
    save_bundle(tmp_path / "m.safetensors", model, words, defaults=SamplingDefaults(4, 16, 16, 4.0, 2))
    attach_lora(model, "style", LoRAConfig(rank=2))
    train_like(model, "style", std=0.3)
    save_lora(tmp_path / "style.safetensors", model, "style")
    return tmp_path / "m.safetensors", tmp_path / "style.safetensors"


def _generate(bundle, out, *extra):
    """The frames the CLI writes to the folder `out`."""
    assert generate.main(["--model", str(bundle), "--prompt", "a red circle", "--out", str(out), *map(str, extra)]) == 0
    return torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]))


def test_the_cli_applies_a_lora_at_its_strength(bundle_and_lora, tmp_path):
    bundle, lora = bundle_and_lora
    plain = _generate(bundle, tmp_path / "plain")
    assert torch.equal(_generate(bundle, tmp_path / "zero", "--lora", f"{lora}:0"), plain)
    styled = _generate(bundle, tmp_path / "styled", "--lora", lora)
    assert not torch.equal(styled, plain)
    assert torch.equal(_generate(bundle, tmp_path / "again", "--lora", f"{lora}:1.0"), styled)


@pytest.mark.parametrize("make,message", [
    (lambda d, lora: f"{lora}:nan", "finite"),
    (lambda d, lora: str(d / "m.safetensors"), "not a STIV LoRA"),
    (lambda d, lora: str(d / "missing.safetensors"), "missing.safetensors"),
])
def test_a_bad_lora_is_one_line_before_the_model_loads(bundle_and_lora, tmp_path, capsys, monkeypatch, make, message):
    bundle, lora = bundle_and_lora
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(bundle), "--prompt", "x", "--out", str(tmp_path / "o.gif"),
                       "--lora", make(bundle.parent, lora)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_parse_lora_arg_takes_a_strength_and_keeps_colons_of_paths():
    from stiv_core.lora import parse_lora_arg

    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
