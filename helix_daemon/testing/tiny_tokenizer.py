"""A small byte-level BPE tokenizer trained offline on a built-in corpus, for tests and demos.

No model hub is reachable in tests, so tiny models need a tokenizer built from nothing. Byte-level
BPE (as GPT-2) can encode any string; the corpus mixes English with a few non-ASCII words and
emoji that are rare enough to stay split into several byte tokens, so multi-byte characters
straddle tokens (the case incremental detokenisation must handle). Training is deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # id 0: bos, eos and pad, matching the tiny model configs
MIN_VOCAB_SIZE = 257  # 256 byte tokens + the special token

_PARAGRAPHS = """\
The scheduler packs every running sequence into one batch at each step, so a short request never
waits for a long one to finish. When memory runs out, the newest request is preempted and its
cache blocks are freed; it will be recomputed later from its prompt and the tokens it already had.
A small draft proposes a few tokens ahead, and the large model checks all of them in one pass.
Tokens that agree with the target distribution are kept, the first one that does not is replaced,
and the output follows exactly the distribution the large model alone would have produced.
We met at the café on Monday morning; the naïve plan was to order a crème brûlée and a coffee.
Her résumé listed Zürich, São Paulo, København and Kraków, and a year studying 日本語 in Kyoto.
Привет, мир! Γειά σου κόσμε. こんにちは世界. 你好，世界。 The day was fine 🙂 and then it rained ☔.
Numbers such as 3.14159, 2048, 1e-9 and 42 appear in logs; so do paths like /var/lib/helix/cache.
def step(self): return self.scheduler.schedule()  # code snippets show up in prompts too
"""

_SYLLABLES = (
    "ka", "ra", "to", "mi", "ne", "lo", "su", "te", "an", "ber", "cor", "dan", "el", "fin", "gor",
    "hal", "ing", "ju", "ken", "lum", "mor", "nor", "or", "pel", "qua", "ren", "sil", "tor", "un",
    "vel", "wen", "xen", "yor", "zu", "the", "and", "ion", "er", "ed", "es", "st", "ly", "ment",
    "ness", "pre", "con",
)


def _corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """Hand-written paragraphs plus seeded pseudo-words, enough distinct pairs for the merges.

    The English lines are repeated so common words merge first; the non-ASCII lines are not, so
    their characters stay split into byte tokens in small vocabularies.
    """
    rng = random.Random(seed)
    lines = _PARAGRAPHS.splitlines()
    lines += [line for line in lines if line.isascii()] * 20
    for _ in range(num_sentences):
        words = ("".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4)))
                 for _ in range(rng.randint(4, 12)))
        lines.append(" ".join(words).capitalize() + rng.choice(".,;!?"))
    return lines


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (``<|endoftext|>`` is id 0).

    The vocabulary can come out smaller than asked for if the corpus runs out of merges (for very
    large sizes); it never comes out larger.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {MIN_VOCAB_SIZE}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the pseudo-word count grows with the vocabulary so the trainer does not run out of merges
    corpus = _corpus(num_sentences=max(1500, vocab_size // 2))
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(path: str | Path, vocab_size: int = 512) -> Path:
    """Build the tokenizer and ``save_pretrained`` it to ``path`` (loadable with AutoTokenizer)."""
    path = Path(path)
    build_tokenizer(vocab_size).save_pretrained(path)
    return path
