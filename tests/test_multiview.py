"""Multi-view generation end to end on a small random multi-view bundle: the CLI writes the views as a grid,
refuses what a multi-view model cannot do, the given view is kept exactly; the evaluator's CLI; the word
encoder grown by the object domain's words; the trainer's multi-view export."""
import numpy as np
import pytest
import torch
from PIL import Image

from stiv_core import evaluate
from stiv_core import generate as cli
from stiv_core.bundle import SamplingDefaults, load_defaults, save_bundle
from stiv_core.config import preset
from stiv_core.data import objects
from stiv_core.data.objects import NUM_VIEWS, ObjectParams, render_view
from stiv_core.encoders.words import WordTextEncoder
from stiv_core.model.transformer import STIVTransformer
from tests.fakes import randomize

DEFAULTS = SamplingDefaults(num_frames=NUM_VIEWS, height=16, width=16, fps=4.0, steps=2, multiview=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    config = preset("tiny", depth=1, hidden_size=32, num_heads=2, text_dim=32, pooled_text_dim=32, max_text_tokens=12)
    torch.manual_seed(0)
    words = WordTextEncoder(list(objects.VOCABULARY), dim=32, max_tokens=12)
    path = tmp_path_factory.mktemp("mv") / "mv.safetensors"
    save_bundle(path, randomize(STIVTransformer(config)), words, defaults=DEFAULTS)
    return path


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    image = render_view(ObjectParams("cube", ("red", "blue"), "gray"), 20.0, objects.INPUT_ELEVATION, 16, 16)
    path = tmp_path_factory.mktemp("view") / "view.png"
    Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(path)
    return path, image


def test_the_views_come_out_as_a_grid_with_the_input_view_first_and_exact(bundle, view, tmp_path):
    assert load_defaults(bundle).multiview
    out = tmp_path / "views.png"
    assert cli.main(["--model", str(bundle), "--image", str(view[0]), "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16, 16 * NUM_VIEWS, 3)
    first = np.asarray(Image.open(view[0]))
    assert np.array_equal(grid[:, :16], first)  # the given view is kept exactly (pixel space)


@pytest.mark.parametrize("extra,message", [
    ([], "give the input view with --image"),
    (["--image", "IMAGE", "--frames", "16"], "makes 8 views .* --frames must be 8, got 16"),
    (["--image", "IMAGE", "--last-image", "IMAGE"], "takes --image only, not --last-image"),
    (["--image", "IMAGE", "--temporal-upsample", "2"], "not --temporal-upsample 2"),
])
def test_what_a_multi_view_model_cannot_do_is_one_clear_error(bundle, view, tmp_path, capsys, extra, message):
    extra = [str(view[0]) if a == "IMAGE" else a for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(bundle), *extra, "--out", str(tmp_path / "v.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "v.png").exists()


def test_a_video_model_still_needs_a_prompt(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(tmp_path / "x.gif")])
    assert exit_info.value.code == 2
    assert "--prompt is required" in capsys.readouterr().err


def test_the_evaluator_defaults_to_multiview_for_a_multi_view_model(bundle, capsys):
    results = evaluate.main(["--model", str(bundle), "--limit", "2", "--steps", "2"])
    assert set(results) == {"multiview", "multiview_baseline"}
    assert results["multiview"]["input_psnr"] == 100.0  # the given view is exact
    assert "multiview-bench" in capsys.readouterr().out
    truth = evaluate.main(["--model", "groundtruth", "--tasks", "multiview", "--limit", "3"])
    assert truth["multiview"]["view_acc"] == 1.0 and truth["multiview_baseline"]["view_acc"] < 1.0
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "groundtruth", "--tasks", "multiview", "t2v"])
    assert exit_info.value.code == 2 and "on its own" in capsys.readouterr().err


def test_a_word_encoder_grows_by_new_words_and_keeps_the_old_ones_exactly():
    torch.manual_seed(0)
    words = WordTextEncoder(["a", "red", "circle"], dim=16, max_tokens=8).eval()
    grown = words.with_words(["red", "cube", "and", "cube"], seed=3)
    assert grown.vocab == ["a", "red", "circle", "cube", "and"]
    assert torch.equal(grown.embed.weight[:3], words.embed.weight)
    again = words.with_words(["cube", "and"], seed=3)
    assert torch.equal(again.embed.weight, grown.embed.weight)  # seeded
    torch.testing.assert_close(grown.encode(["a red circle"]).tokens, words.encode(["a red circle"]).tokens)
    assert words.with_words(["red"], seed=0) is words


def test_an_empty_prompt_is_the_models_learned_empty_text(bundle):
    from stiv_core.bundle import load_pipeline

    pipe = load_pipeline(bundle)
    text = pipe.encode_text(["", "a red and blue cube on a gray background"])
    own = pipe.encode_text(["a red and blue cube on a gray background"])
    assert torch.equal(text.tokens[0], pipe.model.null_text) and text.mask[0].all()
    assert torch.equal(text.pooled[0], pipe.model.null_pooled)
    assert torch.equal(text.tokens[1:], own.tokens) and torch.equal(text.mask[1:], own.mask)
