"""Trains the tiny sentencepiece tokenizer shipped in `data/` (deterministic).

The corpus is every question/answer the synthesisers can emit
(`mmlm.data.synth.corpus_sentences`), the `vicuna_v1` and `llama_3_1` template
text (system prompts, role tags), and one line of printable ASCII so that any
English chat input encodes without `<unk>`. The sentences are weighted so that
each answer word becomes a single piece (`▁red`, `▁triangle`, ...), which
keeps answers one token long (with the default 512 pieces every corpus word is one piece) for exact-match evaluation.

Special ids follow LLaMA: 0 `<unk>`, 1 `<s>`, 2 `</s>`, and 3 `<pad>`.

Run: `mmlm data tokenizer [--out data/tiny_tokenizer.model] [--vocab-size 512]` (`mmlm.cli.data`).
"""

from __future__ import annotations

import io
import itertools
import string
import tempfile
from pathlib import Path
from typing import Iterator

from mmlm.data import synth, templates

DEFAULT_VOCAB_SIZE = 512


def training_sentences() -> Iterator[str]:
    """The tokenizer corpus, in a fixed order (sentencepiece training is order-sensitive)."""
    chat = [templates.VICUNA_SYSTEM, templates.LLAMA3_SYSTEM, "USER:", "ASSISTANT:",
            "USER: <image>", "ASSISTANT: yes", "system", "user", "assistant"]
    for _ in range(20):
        yield from chat
    yield from synth.corpus_sentences()
    # Answers are frequent in training data; repeating them makes each a single piece.
    for _ in range(50):
        yield " ".join(synth.answer_words())
    yield string.ascii_letters + string.digits
    yield string.punctuation
    yield "Describe the image. What is shown in this picture? Answer with one word."


# Normalisation: tab, LF and CR become spaces (LLaVA prompts put "\n" after
# <image>); nothing else changes. A tiny rule table instead of sentencepiece's
# default NFKC table keeps the model file ~8 KB instead of ~240 KB.
_NORMALIZATION_RULES = "9\t20\nA\t20\nD\t20\n"


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Trains the tiny BPE model; returns the serialized model proto."""
    import sentencepiece as spm

    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.tsv"
        rules.write_text(_NORMALIZATION_RULES, encoding="utf-8")
        _train(spm, model, rules, vocab_size)
    # The proto records the rule file's (temporary) path; drop it so the
    # output is byte-identical across runs.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    return proto.SerializeToString(deterministic=True)


def _train(spm, model: io.BytesIO, rules: Path, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(),
        model_writer=model,
        model_type="bpe",
        normalization_rule_tsv=str(rules),
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        split_digits=True,
        num_threads=1,  # deterministic
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )


def check_tokenizer(model_path: str | Path) -> list[str]:
    """Problems with a tiny tokenizer: answer words that are not one piece."""
    from mmlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    problems = []
    for word in synth.answer_words():
        ids = tok.encode(word)
        if len(ids) != 1:
            problems.append(f"answer {word!r} is {len(ids)} pieces {[tok.id_to_token(i) for i in ids]}")
    for sentence in itertools.chain(synth.corpus_sentences(), synth.grid_sentences()):
        if 0 in tok.encode(sentence):
            problems.append(f"<unk> in {sentence!r}")
    return problems

