"""The training recipe: frame replacement with masked loss, condition dropout, tasks, MaskDiT."""
import pytest
import torch

from stiv_core.config import preset
from stiv_core.encoders.hashed import HashedTextEncoder
from stiv_core.model.transformer import STIVTransformer
from stiv_core.training.config import RecipeConfig
from stiv_core.conditioning import FrameReplacementPlan, Task
from stiv_core.training.recipe import (TRAINED_TASKS, TrainBatch, draw_conditioning, masking_active, trained_frames,
                                       training_loss)

CONFIG = preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=16, pooled_text_dim=16,
                max_text_tokens=8, maskdit_extra_blocks=1)


def make_batch(b=4, frames=4, size=16):
    gen = torch.Generator().manual_seed(0)
    text = HashedTextEncoder(16, 16, 8).encode(["a red square"] * b)
    return TrainBatch(torch.randn(b, 3, frames, size, size, generator=gen), text, torch.ones(b, 6))


def test_given_frames_per_task():
    recipe = RecipeConfig(prediction_frames=3, keyframe_stride=3)
    assert trained_frames(Task.T2V, 8, recipe) == []
    assert trained_frames(Task.TI2V, 8, recipe) == [0]
    assert trained_frames(Task.PREDICTION, 8, recipe) == [0, 1, 2]
    assert trained_frames(Task.INTERPOLATION, 8, recipe) == [0, 7]
    assert trained_frames(Task.KEYFRAMES, 8, recipe) == [0, 3, 6]
    assert trained_frames(Task.PREDICTION, 2, recipe) == [0]  # never every frame


def test_dropout_rates_and_independence():
    recipe = RecipeConfig(task_t2v=0.0, task_ti2v=1.0, text_dropout=0.1, image_dropout=0.08)
    cond = draw_conditioning(40000, 4, 16, recipe, masked=False, generator=torch.Generator().manual_seed(1))
    image_dropped = ~cond.given[:, 0]
    assert image_dropped.float().mean().item() == pytest.approx(0.08, abs=0.006)
    assert cond.text_drop.float().mean().item() == pytest.approx(0.10, abs=0.006)
    both = (image_dropped & cond.text_drop).float().mean().item()
    assert both == pytest.approx(0.008, abs=0.002)  # independent: 0.08 * 0.10
    assert not cond.given[image_dropped].any()  # a dropped image condition gives no frame at all


def test_task_mixture_follows_the_weights():
    recipe = RecipeConfig(task_t2v=1, task_ti2v=2, task_prediction=0, task_interpolation=1, task_keyframes=0)
    cond = draw_conditioning(8000, 8, 16, recipe, masked=False, generator=torch.Generator().manual_seed(2))
    share = {task: sum(t == task for t in cond.tasks) / 8000 for task in Task}
    assert share[Task.TI2V] == pytest.approx(0.5, abs=0.03)
    assert share[Task.T2V] == pytest.approx(0.25, abs=0.03)
    assert share[Task.PREDICTION] == share[Task.KEYFRAMES] == 0


class Recorder(torch.nn.Module):
    """Wraps the model, keeping its input and output so the test can look at their gradients."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x, *args, **kwargs):
        self.x = x
        self.out = self.model(x, *args, **kwargs)
        self.out.retain_grad()
        self.kwargs = kwargs
        return self.out


def test_given_frames_are_clean_inputs_and_get_no_gradient():
    torch.manual_seed(0)
    model = Recorder(STIVTransformer(CONFIG))
    torch.nn.init.normal_(model.model.final_linear.weight, std=0.1)  # a non-zero output
    recipe = RecipeConfig(task_t2v=0, task_prediction=1, prediction_frames=2, image_dropout=0.0)
    batch = make_batch()
    loss, cond = training_loss(model, batch, recipe, step=0, generator=torch.Generator().manual_seed(3))
    loss.backward()
    assert cond.given[:, :2].all() and not cond.given[:, 2:].any()
    torch.testing.assert_close(model.x[:, :, :2], batch.latents[:, :, :2])   # frame replacement
    assert not torch.allclose(model.x[:, :, 2:], batch.latents[:, :, 2:])   # noised
    assert torch.equal(model.kwargs["frame_mask"], cond.given)
    grad = model.out.grad
    assert torch.count_nonzero(grad[:, :, :2]) == 0
    assert torch.count_nonzero(grad[:, :, 2:]) == grad[:, :, 2:].numel()


def test_maskdit_keeps_exactly_half_of_the_spatial_tokens():
    torch.manual_seed(0)
    model = STIVTransformer(CONFIG)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    model.extra_blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    recipe = RecipeConfig(maskdit_ratio=0.5, maskdit_until_step=10)
    batch = make_batch(b=3, frames=4, size=16)  # 16/4 = 4x4 = 16 spatial tokens, 2 temporal
    _, cond = training_loss(model, batch, recipe, step=0, generator=torch.Generator().manual_seed(0))
    assert seen == [(3, 2, 8, 32), (3, 2, 16, 32)]  # main blocks see 8 of 16; extra blocks all 16
    keep = cond.keep_index
    assert keep.shape == (3, 8) and all(len(set(row.tolist())) == 8 for row in keep)
    assert not all(torch.equal(keep[0], row) for row in keep[1:])  # a fresh mask per sample
    seen.clear()
    _, cond = training_loss(model, batch, recipe, step=10, generator=torch.Generator().manual_seed(0))
    assert cond.keep_index is None and seen == [(3, 2, 16, 32), (3, 2, 16, 32)]  # the unmasked phase
    assert masking_active(recipe, 9) and not masking_active(recipe, 10)


def test_maskdit_scores_only_the_kept_tokens():
    torch.manual_seed(0)
    model = Recorder(STIVTransformer(CONFIG))
    torch.nn.init.normal_(model.model.final_linear.weight, std=0.1)
    recipe = RecipeConfig(maskdit_ratio=0.5, maskdit_until_step=10, task_t2v=1, task_ti2v=0, task_prediction=0,
                          task_interpolation=0, task_keyframes=0)
    loss, cond = training_loss(model, make_batch(b=3), recipe, step=0, generator=torch.Generator().manual_seed(4))
    loss.backward()
    kept = torch.zeros(3, 16, dtype=torch.bool)
    kept.scatter_(1, cond.keep_index, True)
    kept = kept.view(3, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)   # token (r, c) -> its 4x4 pixels
    grad = model.out.grad.permute(0, 2, 1, 3, 4)   # (B, T, C, H, W)
    assert torch.count_nonzero(grad[~kept[:, None, None].expand_as(grad)]) == 0
    assert torch.count_nonzero(grad[kept[:, None, None].expand_as(grad)]) == int(kept.sum()) * 4 * 3


@pytest.mark.parametrize("frames", [1, 2, 4, 8])
def test_every_training_task_is_its_sampling_plan(frames):
    """The trainer gives exactly the frames the sampler's plan of the same task gives (one rule, in
    conditioning.given_frames), for the k and S the recipe picks."""
    recipe = RecipeConfig(prediction_frames=3, keyframe_stride=3)
    clip = torch.randn(1, 3, frames, 4, 4)
    for task in TRAINED_TASKS:
        given = trained_frames(task, frames, recipe)
        assert len(given) < frames or frames == 1 and not given  # something is always generated
        if not given:
            continue
        stride = recipe.keyframe_stride if task is Task.KEYFRAMES else 1
        plan_task = Task.TI2V if task is Task.INTERPOLATION and frames == 2 else task
        plan = FrameReplacementPlan.for_task(plan_task, frames, clip[:, :, given], stride=stride)
        assert list(plan.given) == given


def test_the_loss_mask_comes_from_the_plan_of_the_drawn_tasks():
    recipe = RecipeConfig(task_t2v=1, task_ti2v=1, task_prediction=1, task_interpolation=1, task_keyframes=1,
                          image_dropout=0.0)
    cond = draw_conditioning(64, 8, 16, recipe, masked=False, generator=torch.Generator().manual_seed(4))
    for task, row in zip(cond.tasks, cond.given):
        assert row.nonzero().flatten().tolist() == trained_frames(task, 8, recipe)
    assert set(cond.tasks) == set(TRAINED_TASKS) and set(recipe.task_weights) == set(TRAINED_TASKS)
