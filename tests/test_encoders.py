"""The built-in encoders: pixel identity VAE and the learned word-level text encoder."""
import logging

import pytest
import torch

from stiv_core.encoders.pixel import PixelVAE
from stiv_core.encoders.words import WordTextEncoder
from stiv_core.interfaces import TextEncoder, VideoVAE

VOCAB = ["a", "red", "blue", "circle", "square", "moving", "left", "on", "background"]


def encoder(seed=0):
    torch.manual_seed(seed)
    return WordTextEncoder(VOCAB, dim=32, max_tokens=12).eval()


def test_pixel_vae_is_an_exact_identity():
    vae = PixelVAE()
    assert isinstance(vae, VideoVAE)
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    assert torch.equal(vae.decode(vae.encode(x)), x)
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        vae.encode(torch.rand(3, 4, 8, 8))


def test_unknown_words_are_warned_about_and_ignored(caplog):
    enc = encoder()
    assert isinstance(enc, TextEncoder)
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            a = enc.encode(["a red zebra circle moving left"])
            b = enc.encode(["a red circle moving left"])
    assert "zebra" in caplog.text
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_a_long_prompt_is_warned_about_by_its_first_words_and_count(caplog):
    prompt = " ".join(["a red circle moving left on a blue background"] * 1111)  # 9999 words, 60 KB
    with caplog.at_level(logging.WARNING):
        ids, _ = encoder().token_ids([prompt])
    assert ids.shape == (1, 12)
    assert "'a red circle moving left on a blue ...' (9999 words) has 9999 known words; only the first 12" \
        in caplog.text
    assert len(caplog.text) < 500


def test_characters_no_word_is_made_of_are_warned_about_and_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            a = encoder().encode(["a red \U0001F534 circle, moving left! \u2014 \u201con\u201d a blue background"])
            b = encoder().encode(["a red circle moving left on a blue background"])
    assert caplog.text.count("WARNING") == 1   # punctuation, ASCII or not, separates words silently
    assert "characters ignored" in caplog.text and "U+1F534" in caplog.text
    torch.testing.assert_close(a.tokens, b.tokens)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder().token_ids(["a red caf\u00e9"])
    assert "caf" in caplog.text and "\u00e9 (U+00E9)" in caplog.text


def test_many_unknown_words_are_listed_twenty_at_most(caplog):
    with caplog.at_level(logging.WARNING):
        encoder().token_ids([" ".join(f"w{i:03d}" for i in range(100))])
    assert "w000, w001" in caplog.text and "w019 and 80 more" in caplog.text and "w020" not in caplog.text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_context_tells_object_colour_from_background_colour(seed):
    """The same colour word as the object's and as the background's must be clearly different tokens
    (the shipped model's encoder had them at cosine 0.998 and swapped the two colours)."""
    with torch.no_grad():
        e = encoder(seed).encode(["a blue circle on a red background", "a red circle on a blue background"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(e.tokens[0, 1], e.tokens[1, 5], dim=0) < 0.8  # "blue": object vs background
    assert cos(e.tokens[0, 5], e.tokens[1, 1], dim=0) < 0.8  # "red"
    assert not torch.allclose(e.pooled[0], e.pooled[1], atol=1e-4)
    assert e.mask.sum(1).tolist() == [7, 7]


def test_padding_and_empty_prompts_are_safe():
    with torch.no_grad():
        enc = encoder()
        e = enc.encode(["a red circle", "zzz", "a red circle moving left on a blue background"])
        alone = enc.encode(["a red circle"])
    assert torch.isfinite(e.tokens).all() and torch.isfinite(e.pooled).all()
    assert e.mask[1].sum() == 0 and torch.count_nonzero(e.tokens[1]) == 0
    torch.testing.assert_close(e.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)


def test_metadata_round_trip_rebuilds_the_same_encoder():
    enc = encoder()
    again = WordTextEncoder.from_metadata(enc.metadata())
    again.load_state_dict(enc.state_dict())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(["a blue square"]).pooled, again.encode(["a blue square"]).pooled)
    with pytest.raises(ValueError, match="distinct"):
        WordTextEncoder(["a", "a"])
