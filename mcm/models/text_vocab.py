"""A word-level tokenizer over the ``shapes`` caption vocabulary, built with ``tokenizers``.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer`` and
``PreTrainedTokenizerFast`` load it like any Hugging Face tokenizer.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from datamodules.shapes import CLASS_NAMES, COLOURS

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def shapes_vocabulary() -> list[str]:
    """Every word the shapes captions use (plural forms too, for users' prompts)."""
    words = ["a", "an", "and", ",", "empty", "scene", "with", "two", "three", "four"]
    words += list(COLOURS) + [n for n in CLASS_NAMES if n != "background"]
    words += [n + ("es" if n.endswith("s") else "s") for n in CLASS_NAMES if n != "background"]
    return SPECIAL + sorted(set(words))


def build_shapes_tokenizer(max_length: int = 24) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(shapes_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=max_length)
    return fast
