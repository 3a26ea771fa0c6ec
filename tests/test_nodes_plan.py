"""GET /stiv/plan (nodes/plan.py) beyond the happy path of tests/test_nodes_comfy.py: a bare model's sizes are
planned in its VAE's latent units, the budget is the whole device (not what the loaded models leave free),
and a malformed query is a 400 with a clear message, not a 500."""
from __future__ import annotations

import asyncio
import sys
import types as pytypes

import pytest
import torch

from stiv_core.bundle import SamplingDefaults, TrainedWith, save_bare_model
from stiv_core.config import preset
from stiv_core.memory.planner import GiB, Budget, RunShape, plan_memory
from stiv_core.model.transformer import STIVTransformer
from tests.fakes import randomize
from tests.pack import MODEL_FILE, fake_comfy, pack_module, write_small_bundle

plan = pack_module("nodes.plan")
BARE_FILE = "bare.safetensors"
# an SDXL-like VAE as tests/test_nodes_bare_model.py records it: 12 channels, 2 pixels per latent
TRAINED = TrainedWith(vae_kind="diffusers", latent_channels=12, spatial_factor=2, vae_family="sdxl",
                      text_encoder="hf", text_dim=32, pooled_text_dim=32)


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A bundle (pixel VAE, patch 4) and a bare model (VAE factor 2, patch 2), both temporal patch 2."""
    write_small_bundle(tmp_path)
    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, latent_channels=12, patch_size=2,
                    temporal_patch=2, text_dim=32, pooled_text_dim=32, max_text_tokens=8)
    torch.manual_seed(0)
    save_bare_model(tmp_path / BARE_FILE, randomize(STIVTransformer(config)), TRAINED,
                    defaults=SamplingDefaults(num_frames=4, height=16, width=16, steps=2))
    monkeypatch.setenv("STIV_MODEL_DIRS", str(tmp_path))
    return config


class TestBareModel:
    def test_sizes_are_planned_in_latent_units(self, models):
        answer = plan.describe_plan(plan.PlanQuery(BARE_FILE, 4, 16, 16, guidance="none"))
        assert "error" not in answer, answer
        # 16 px = 8 latents = 4 patches a side: (4 // 2) * 4 * 4, not (4 // 2) * 8 * 8 as pixels would give
        assert answer["tokens"] == 2 * 4 * 4
        latent = RunShape(4, 8, 8, passes=1)
        expected = plan_memory(models, latent, Budget(GiB, GiB, "cpu"), dtype=torch.float32,
                               blocks_to_swap=0, vae=plan.vae_profile(TRAINED))
        assert answer["peak_bytes"] == expected.peak_bytes

    def test_sizes_must_be_multiples_of_the_vae_factor_times_the_patch(self, models):
        error = plan.describe_plan(plan.PlanQuery(BARE_FILE, 4, 18, 16))["error"]   # 18 px: patch 2 yes, 2 x 2 no
        assert "multiples of 4" in error and "2 pixels per latent x patch 2" in error

    def test_the_vae_profile_is_the_recorded_one(self):
        assert plan.vae_profile(None) is plan.PIXEL_VAE   # a bundle: pixel space
        assert plan.vae_profile(TrainedWith()) is plan.PIXEL_VAE   # a bare pixel-space model
        assert plan.vae_profile(TRAINED).spatial_factor == 2


class TestBudget:
    def test_the_plan_is_made_against_the_whole_device_not_what_is_free_now(self, models, monkeypatch):
        """With the device full of loaded models (probe: 1 KiB free) the plan still fits: the sampler frees
        them before the run, so the question is whether it fits the device with nothing else on it."""
        budget = plan.Budget   # the pack's own import of stiv_core
        monkeypatch.setattr(budget, "probe", classmethod(lambda cls, device: cls(1024, 1024, "cpu")))
        monkeypatch.setattr(budget, "whole_device", classmethod(lambda cls, device: cls(8 * GiB, 4 * GiB, "cpu")))
        answer = plan.describe_plan(plan.PlanQuery(MODEL_FILE, 4, 16, 16))
        assert answer["fits"] and "budget: all 8.00 GiB of host RAM" in answer["text"]
        assert "of 8.00 GiB" in answer["text"]   # the planner's verdict is against the same budget

    def test_the_budget_line_names_the_device(self):
        text = plan.budget_text(Budget(24 * GiB, 40 * GiB, "cuda"), torch.device("cuda", 0))
        assert text.startswith("budget: all 24.00 GiB of cuda:0") and "40.00 GiB of host RAM available" in text


class TestQuery:
    @pytest.mark.parametrize("query,message", [
        ({"frames": "4", "width": "16", "height": "16"}, "missing model_name"),
        ({"model_name": MODEL_FILE, "width": "16"}, "missing frames, height"),
        ({"model_name": MODEL_FILE, "frames": "four", "width": "16", "height": "16"}, "frames must be an integer"),
        ({"model_name": MODEL_FILE, "frames": "4", "width": "16", "height": "16", "block_swap": "1.5"},
         "block_swap must be an integer"),
        ({"model_name": MODEL_FILE, "frames": "0", "width": "16", "height": "16"}, "frames must be >= 1"),
        ({"model_name": MODEL_FILE, "frames": "4", "width": "16", "height": "16", "weight_dtype": "fp64"},
         "weight_dtype must be one of"),
    ])
    def test_a_malformed_query_is_a_value_error_naming_the_field(self, query, message):
        with pytest.raises(ValueError, match=message):
            plan.PlanQuery.from_query(query)

    def test_the_route_answers_a_malformed_query_with_400(self, tmp_path, monkeypatch):
        modules, routes = fake_comfy(tmp_path, [])
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        assert plan.register_routes()
        request = pytypes.SimpleNamespace(rel_url=pytypes.SimpleNamespace(query={"frames": "4"}))
        status, body = asyncio.run(routes.served()[plan.ROUTE](request))
        assert status == 400 and "missing model_name" in body["error"]

    def test_unknown_keys_are_ignored(self):
        q = plan.PlanQuery.from_query({"model_name": "m", "frames": "4", "width": "16", "height": "16", "x": "y"})
        assert q == plan.PlanQuery("m", 4, 16, 16)
