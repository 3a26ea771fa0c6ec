"""generate(): one pipeline for every task, seeded, with clear errors for sizes that don't fit."""
import logging
from dataclasses import replace

import pytest
import torch

from stiv_core.pipeline import (FrameCondition, GenerationRequest, generate, generate_long,
                                interpolate_keyframes, long_video_latents, seeded_noise,
                                temporal_upsample_latents)
from stiv_core.sampling import GuidanceConfig, SamplerConfig
from tests.fakes import tiny_pipeline

FAST = SamplerConfig(steps=3, guidance=GuidanceConfig("jit", scale=3.0))


def pixels(t, seed=0, size=8):
    return torch.rand(1, 3, t, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def request(**kw):
    base = dict(prompt="a red circle moving left", num_frames=4, height=8, width=8, seed=3, sampler=FAST)
    return GenerationRequest(**{**base, **kw})


def test_same_seed_same_video_and_another_seed_another():
    pipe = tiny_pipeline()
    a, b = generate(pipe, request()), generate(pipe, request())
    assert a.shape == (1, 3, 4, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, generate(pipe, request(seed=4)))
    assert torch.equal(seeded_noise((2, 3), 9), seeded_noise((2, 3), 9))


def test_ti2v_keeps_the_given_first_frame():
    pipe = tiny_pipeline()
    image = pixels(1)
    video = generate(pipe, request(condition=FrameCondition(image, (0,))))
    roundtrip = pipe.vae.decode(pipe.vae.encode(image))
    torch.testing.assert_close(video[:, :, 0], roundtrip[:, :, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(video[:, :, 0], image[:, :, 0], rtol=0, atol=1e-5)  # the fake VAE is exact


def test_interpolation_keeps_both_ends_for_every_prompt():
    pipe = tiny_pipeline()
    ends = pixels(2, seed=1)
    video = generate(pipe, request(prompt=["red", "blue"], num_frames=6, condition=FrameCondition(ends, (0, 5))))
    assert video.shape == (2, 3, 6, 8, 8)
    for i in range(2):
        torch.testing.assert_close(video[i, :, [0, 5]], ends[0], rtol=0, atol=1e-5)


def test_long_video_is_keyframes_then_interpolation_sharing_boundaries():
    pipe = tiny_pipeline()
    keys_request = request(num_frames=4, frame_stride=3)
    keys = pipe.sample_latents(keys_request)
    latents = long_video_latents(pipe, request(), keyframes=4, stride=3)
    assert latents.shape[2] == (4 - 1) * 3 + 1
    assert torch.equal(latents[:, :, ::3], keys)
    video = generate_long(pipe, request(), keyframes=4, stride=3)
    assert video.shape == (1, 3, 10, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=10), "multiples of 4"),
    (dict(num_frames=5), "multiple of 2"),
    (dict(condition=FrameCondition(pixels(1, size=16), (0,))), "resize"),
])
def test_bad_requests_say_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_pipeline(), request(**kwargs))


def test_long_video_refuses_what_the_temporal_patch_cannot_take():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="at least 2 keyframes"):
        long_video_latents(pipe, request(), keyframes=1, stride=3)
    with pytest.raises(ValueError, match="multiples of 2"):
        long_video_latents(pipe, request(), keyframes=4, stride=2)


def test_condition_frames_must_match_their_indices():
    with pytest.raises(ValueError, match="one frame per index"):
        FrameCondition(pixels(2), (0,))


def test_long_prompts_are_truncated_with_a_warning(caplog):
    pipe = tiny_pipeline()  # max 8 text tokens
    with caplog.at_level(logging.WARNING):
        text = pipe.encode_text([" ".join(f"w{i}" for i in range(12))])
    assert text.tokens.shape[1] == 8 and "4 tokens beyond" in caplog.text
    short = pipe.encode_text(["one two"])
    assert short.tokens.shape[1] == 8 and short.mask[0].tolist() == [True] * 2 + [False] * 6


def test_negative_prompt_changes_the_result():
    pipe = tiny_pipeline()
    base = generate(pipe, request())
    assert not torch.allclose(base, generate(pipe, replace(request(), negative_prompt="blurry static")))


@pytest.mark.parametrize("frames", [2, 3, 5, 9])
def test_temporal_upsample_doubles_the_frame_rate_keeping_every_frame(frames):
    pipe = tiny_pipeline()
    latents = torch.randn(1, 12, frames, 4, 4, generator=torch.Generator().manual_seed(frames))
    up = temporal_upsample_latents(pipe, request(num_frames=6), latents)
    assert up.shape[2] == 2 * frames - 1
    assert torch.equal(up[:, :, ::2], latents)
    assert not torch.allclose(up[:, :, 1::2], torch.zeros_like(up[:, :, 1::2]))


def test_temporal_upsample_refuses_a_window_the_patch_cannot_take():
    pipe = tiny_pipeline(temporal_patch=4)
    with pytest.raises(ValueError, match="temporal patch 4"):
        temporal_upsample_latents(pipe, request(num_frames=6), torch.randn(1, 12, 5, 4, 4))


def test_temporal_upsample_refuses_a_single_frame_and_a_two_frame_window():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_upsample_latents(pipe, request(num_frames=6), torch.randn(1, 12, 1, 4, 4))
    with pytest.raises(ValueError, match="at least 4 frames"):
        temporal_upsample_latents(pipe, request(num_frames=2), torch.randn(1, 12, 3, 4, 4))


def test_keyframes_then_interpolation_as_two_passes_equals_the_long_video():
    pipe = tiny_pipeline()
    keys = pipe.sample_latents(request(num_frames=4, frame_stride=3))
    chained = interpolate_keyframes(pipe, request(), keys, stride=3)
    assert torch.equal(chained, long_video_latents(pipe, request(), keyframes=4, stride=3))
    with pytest.raises(ValueError, match="multiples of 2"):
        interpolate_keyframes(pipe, request(), keys, stride=2)
