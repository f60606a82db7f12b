"""Build engine/resources/tokenizer/fallback.json: Headroom's fallback tokenizer.

A byte-level BPE (GPT-2's scheme: any UTF-8 text encodes, no unknown tokens) with a vocabulary of
8192, trained with the ``tokenizers`` library on the built-in sample corpus. It is used when a
model comes without a tokenizer of its own (presets are architecture-only), so token counts stay
realistic for English text without downloading anything.

Run from the repository root:  python scripts/build_fallback_tokenizer.py
The output is committed; rerun only when the corpus extraction or the special tokens change.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.data.corpus import build_corpus
from engine.data.tokens import FALLBACK_PATH, FALLBACK_SPECIAL_TOKENS, FALLBACK_VOCAB_SIZE


def main() -> None:
    corpus = build_corpus()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=FALLBACK_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(FALLBACK_SPECIAL_TOKENS.values()),
        # All 256 byte symbols up front, so every byte string is encodable whatever the corpus holds.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    FALLBACK_PATH.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(FALLBACK_PATH), pretty=False)
    print(f"wrote {FALLBACK_PATH.relative_to(REPO)}: vocab {tokenizer.get_vocab_size()}, "
          f"{FALLBACK_PATH.stat().st_size} bytes, trained on {len(corpus)} texts")


if __name__ == "__main__":
    main()
