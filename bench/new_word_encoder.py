"""Write a copy of a bundle whose word encoder is built afresh by this code (same vocabulary and widths).

The trainer keeps the word encoder saved in `init.path` (a finetune reads text the way it learnt to). When
the encoder's init changes (word positions went from std 0.02 to 0.5, see BENCHMARKS.md), this makes the
starting bundle for a finetune that moves the model onto the new encoder:

    python bench/new_word_encoder.py stiv_core/weights/stiv_tiny.safetensors runs/start.safetensors --seed 0

With `--seed` equal to the run's `seed`, the result is the encoder a from-scratch run builds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stiv_core.bundle import load_defaults, load_pipeline, save_bundle  # noqa: E402
from stiv_core.checkpoint import read_metadata  # noqa: E402
from stiv_core.encoders.words import WordTextEncoder  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the training config's seed (tiny.toml: 0)")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.bundle)  # a bare model (no word encoder) is refused here, with the reason
    old = pipe.text_encoder
    new = WordTextEncoder.seeded(old.vocab, dim=old.dim, max_tokens=old.max_tokens, seed=args.seed)
    dtype = next(pipe.model.parameters()).dtype
    meta = {k: v for k, v in read_metadata(args.bundle).items() if k not in new.metadata()}
    save_bundle(args.out, pipe.model, new, defaults=load_defaults(args.bundle), dtype=dtype, metadata=meta)
    print(f"{args.out}: word positions std {old.position.std():.3f} -> {new.position.std():.3f}")


if __name__ == "__main__":
    main()
