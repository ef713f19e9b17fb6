"""Tokenizers and conversation templates: exact ids, label masks, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.data import make_tokenizer, synth, templates
from mmlm.data.tokenizer import (TINY_TOKENIZER_PATH, HFTokenizer, SentencePieceTokenizer,
                                 load_tokenizer)

I, X = IMAGE_TOKEN_ID, IGNORE_INDEX

WORDS = ["Be", "brief", ".", "USER", ":", "ASSISTANT", "What", "color", "is", "the", "circle", "?",
         "red", "How", "many", "two", "system", "user", "assistant", "A", "dog", "Look", "at", "this",
         "please", "and", "tell", "me", "now"]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.fixture(scope="module")
def data_word_tokenizer(tmp_path_factory) -> HFTokenizer:
    """A word-level HF tokenizer with known ids: <unk>=0 <s>=1 </s>=2 <pad>=3, words from 4."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS + SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("wordtok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def data_llama3_tokenizer(tmp_path_factory, data_word_tokenizer) -> HFTokenizer:
    """The same vocabulary with LLaMA-3 style BOS / EOS (<|eot_id|>) and no pad token."""
    d = tmp_path_factory.mktemp("llama3tok")
    (d / "tokenizer.json").write_text(Path(data_word_tokenizer.path).read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}))
    return load_tokenizer(d / "tokenizer.json")


def ids(tok, *tokens):
    return [tok.token_to_id(t) for t in tokens]


CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many?"},
    {"from": "gpt", "value": "two"},
]


def test_word_tokenizer_interface(data_word_tokenizer):
    tok = data_word_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == 4 + len(WORDS) + len(SPECIALS)
    assert not tok.adds_prefix_space
    assert tok.encode("What color", add_bos=True) == [1] + ids(tok, "What", "color")
    assert tok.decode([I] + ids(tok, "red") + [X]) == "red"


def test_tiny_tokenizer_interface():
    tok = load_tokenizer(None)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 512)
    assert tok.adds_prefix_space
    text = "Is the red circle left or right of the blue square?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, add_bos=True)[0] == tok.bos_id
    # Every answer is one piece and nothing the synthesisers emit is <unk>.
    assert make_tokenizer.check_tokenizer(TINY_TOKENIZER_PATH) == []
    for word in synth.answer_words():
        assert len(tok.encode(word)) == 1, word


def test_tiny_tokenizer_regenerates_identically():
    assert make_tokenizer.train_tokenizer() == TINY_TOKENIZER_PATH.read_bytes()


def test_vicuna_v1_exact_ids_and_labels(data_word_tokenizer):
    tok = data_word_tokenizer
    out = templates.encode_conversation(tok, CONV, "vicuna_v1", 64, system="Be brief.")
    want = ([1] + ids(tok, "Be", "brief", ".", "USER", ":") + [I]
            + ids(tok, "What", "color", "is", "the", "circle", "?", "ASSISTANT", ":", "red") + [2]
            + ids(tok, "USER", ":", "How", "many", "?", "ASSISTANT", ":", "two") + [2])
    labels = [X] * 15 + ids(tok, "red") + [2] + [X] * 7 + ids(tok, "two") + [2]
    assert out["input_ids"].tolist() == want
    assert out["labels"].tolist() == labels
    assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32
    assert out["image_pos"] == 6 and not out["truncated"] and out["num_tokens"] == len(want)


def test_llama_3_1_exact_ids_and_labels(data_llama3_tokenizer):
    tok = data_llama3_tokenizer
    bos, eot, sh, eh = ids(tok, *SPECIALS)
    # No pad_token configured: the well-known "<pad>" entry is found instead.
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eot, 3)
    out = templates.encode_conversation(tok, CONV, "llama_3_1", 64, system="Be brief.")
    want = ([bos, sh] + ids(tok, "system") + [eh] + ids(tok, "Be", "brief", ".") + [eot]
            + [sh] + ids(tok, "user") + [eh, I] + ids(tok, "What", "color", "is", "the", "circle", "?") + [eot]
            + [sh] + ids(tok, "assistant") + [eh] + ids(tok, "red") + [eot]
            + [sh] + ids(tok, "user") + [eh] + ids(tok, "How", "many", "?") + [eot]
            + [sh] + ids(tok, "assistant") + [eh] + ids(tok, "two") + [eot])
    sup = {22, 23, len(want) - 2, len(want) - 1}  # "red" <|eot_id|> ... "two" <|eot_id|>
    assert out["input_ids"].tolist() == want
    assert out["labels"].tolist() == [t if i in sup else X for i, t in enumerate(want)]
    assert out["image_pos"] == 11
    assert templates.stop_token_ids(tok, "llama_3_1") == [eot]


def test_plain_template(data_word_tokenizer):
    tok = data_word_tokenizer
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A dog ."}]
    out = templates.encode_conversation(tok, conv, "plain", 16)
    caption = ids(tok, "A", "dog", ".")
    assert out["input_ids"].tolist() == [1, I] + caption + [2]
    assert out["labels"].tolist() == [X, X] + caption + [2]
    assert templates.encode_prompt(tok, "ignored", "plain", has_image=True) == [1, I]


def test_tiny_sentencepiece_vicuna_matches_piecewise_encoding():
    """With a dummy-prefix tokenizer each piece's leading space is the `▁` prefix."""
    tok = load_tokenizer(None)
    out = templates.encode_conversation(tok, CONV[:2], "vicuna_v1", 128)
    want = ([tok.bos_id] + tok.encode(templates.VICUNA_SYSTEM) + tok.encode("USER: ") + [I]
            + tok.encode("\nWhat color is the circle?") + tok.encode("ASSISTANT:") + tok.encode("red")
            + [tok.eos_id])
    assert out["input_ids"].tolist() == want
    assert [t for t in out["labels"].tolist() if t != X] == tok.encode("red") + [tok.eos_id]
    assert 0 not in want  # no <unk>: the tiny tokenizer covers the template text
    assert tok.decode(out["input_ids"]).endswith("USER: What color is the circle? ASSISTANT: red")


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3_1"])
def test_prompt_is_prefix_up_to_answer(template, data_llama3_tokenizer):
    tok = data_llama3_tokenizer
    full = templates.encode_conversation(tok, CONV, template, 128)
    labels = full["labels"].tolist()
    prompt = templates.encode_prompt(tok, "What color is the circle?", template, has_image=True)
    first_answer = next(i for i, t in enumerate(labels) if t != X)
    assert prompt == full["input_ids"].tolist()[:first_answer]
    # A second turn with history ends right before the second answer.
    prompt2 = templates.encode_prompt(tok, "How many?", template, has_image=True,
                                      history=[("What color is the circle?", "red")])
    second_answer = max(i for i, t in enumerate(labels) if t == X) + 1
    assert prompt2 == full["input_ids"].tolist()[:second_answer]
    assert prompt2.count(I) == 1


def test_text_only_has_no_placeholder(data_word_tokenizer):
    conv = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]
    out = templates.encode_conversation(data_word_tokenizer, conv, "vicuna_v1", 32, system="")
    assert I not in out["input_ids"].tolist() and out["image_pos"] == -1
    with pytest.raises(ValueError, match="has_image"):
        templates.encode_prompt(data_word_tokenizer, "<image> What?", "vicuna_v1", has_image=False)


def test_video_marker_and_leading_gpt_turn(data_word_tokenizer):
    conv = [{"from": "gpt", "value": "dropped"}, {"from": "user", "value": "<video>\nHow many?"},
            {"from": "assistant", "value": "two"}]
    out = templates.encode_conversation(data_word_tokenizer, conv, "vicuna_v1", 32, system="")
    assert out["input_ids"].tolist().count(I) == 1


def test_marker_outside_first_turn_is_rejected(data_word_tokenizer):
    conv = CONV[:2] + [{"from": "human", "value": "<image> How many?"}, {"from": "gpt", "value": "two"}]
    with pytest.raises(ValueError, match="first human turn"):
        templates.encode_conversation(data_word_tokenizer, conv, "vicuna_v1", 64)
    with pytest.raises(ValueError, match="alternate"):
        templates.encode_conversation(data_word_tokenizer, [CONV[0], CONV[2]], "vicuna_v1", 64)
    with pytest.raises(ValueError, match="unknown template"):
        templates.encode_conversation(data_word_tokenizer, CONV, "chatml", 64)


def test_truncation_is_counted_and_keeps_placeholder(data_word_tokenizer):
    tok = data_word_tokenizer
    full = templates.encode_conversation(tok, CONV, "vicuna_v1", 64, system="Be brief.")
    cut = templates.encode_conversation(tok, CONV, "vicuna_v1", 20, system="Be brief.")
    assert cut["truncated"] and cut["num_tokens"] == len(full["input_ids"]) == 26
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[:20]
    assert cut["labels"].tolist() == full["labels"].tolist()[:20]
    assert cut["image_pos"] == 6


def test_truncation_drops_text_before_a_late_placeholder(data_word_tokenizer):
    tok = data_word_tokenizer
    conv = [{"from": "human", "value": "Look at this please and tell me now <image> What color?"},
            {"from": "gpt", "value": "red"}]
    out = templates.encode_conversation(tok, conv, "vicuna_v1", 8, system="Be brief.")
    # [<s> Be brief . USER :] then the first words before <image> give way.
    assert out["truncated"] and len(out["input_ids"]) == 8
    assert out["image_pos"] == 7 and out["input_ids"][7] == I
    assert out["input_ids"].tolist()[:6] == [1] + ids(tok, "Be", "brief", ".", "USER", ":")
    assert out["input_ids"][6] == tok.token_to_id("now")
    with pytest.raises(ValueError, match="max_text_len"):
        templates.encode_conversation(tok, conv, "vicuna_v1", 5, system="Be brief.")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_tokenizers_pickle_by_path(data_word_tokenizer):
    import pickle

    for tok in (data_word_tokenizer, load_tokenizer(None)):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.path == tok.path and clone.encode("What color") == tok.encode("What color")
