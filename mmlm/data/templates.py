"""Conversation templates and tokenisation with LLaVA label masks.

Templates (LLaVA / LLaVA-Mini names):

* `vicuna_v1` (LLaVA-1.5, Vicuna-7B v1.5)::

    <s>SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>

* `llama_3_1` (LLaVA-Mini LLaMA-3.1-8B-Instruct)::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nSYSTEM<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\nQ1<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nA1<|eot_id|>...

* `plain` (stage-1 pretraining): `<s><image>CAPTION</s>`; only the caption
  and its end token are supervised. (LLaVA ends the caption with "\\n"; mmlm
  uses EOS so that generation stops by itself.)

How ids are built: the prompt is a list of pieces (text, special-token ids,
the image placeholder). Each text piece is encoded on its own and the ids are
concatenated, so label masks are exact by construction (no re-tokenisation
and offset arithmetic as in LLaVA's `preprocess_v1`). Pieces are split only
at special tokens, at the placeholder and at word boundaries, where
tokenising pieces separately gives the same ids as tokenising the whole
string. For tokenizers with a dummy-prefix space (sentencepiece), one leading
space of a piece is dropped because the dummy prefix stands for it; like
LLaVA's chunked `tokenizer_image_token` (legacy LLaMA tokenizer), the text
after `</s>` therefore starts with `▁USER`.

Labels: IGNORE_INDEX (-100) everywhere except the assistant answers and the
end-of-turn token after each answer (EOS, or `<|eot_id|>`). Labels are not
shifted. The `<image>` marker (or `<video>`, LLaVA-Mini's video marker)
becomes one IMAGE_TOKEN_ID (-200) at the place it has in the text.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mmlm import IGNORE_INDEX, IMAGE_TOKEN_ID
from mmlm.data.tokenizer import Tokenizer

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
MEDIA_MARKERS = (IMAGE_MARKER, VIDEO_MARKER)
TEMPLATES = ("vicuna_v1", "llama_3_1", "plain")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of "
    "tasks using natural language.")

HUMAN, GPT = "human", "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One piece of a prompt: text, a special-token id, or the image placeholder."""

    kind: str  # "text" | "id" | "image"
    value: Any = None
    supervised: bool = False
    trimmable: bool = False  # text before the placeholder that truncation may drop


def normalize_turns(conversations: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(role, text)] with roles "human"/"gpt".

    Accepts `from` values human/user and gpt/assistant. Leading assistant
    turns are dropped (as LLaVA does). Raises ValueError on unknown roles,
    non-string values, or turns that do not alternate human/gpt.
    """
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i} is a {type(turn).__name__}, expected an object")
        role = ROLE_ALIASES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"turn {i} has unknown role {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {i} value is {type(value).__name__}, expected a string")
        turns.append((role, value))
    while turns and turns[0][0] == GPT:
        turns.pop(0)
    for i, (role, _) in enumerate(turns):
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise ValueError(f"turn {i} is from {role!r}; turns must alternate human/gpt")
    return turns


def count_markers(text: str) -> int:
    """Number of `<image>` / `<video>` markers in `text`."""
    return sum(text.count(m) for m in MEDIA_MARKERS)


def _split_marker(text: str) -> tuple[str, str] | None:
    """(before, after) around the single media marker, or None if absent."""
    for marker in MEDIA_MARKERS:
        if marker in text:
            before, after = text.split(marker, 1)
            if count_markers(after) or count_markers(before):
                raise ValueError(f"more than one media marker in {text!r}")
            return before, after
    return None


def _human_content(text: str, lead: str, allow_image: bool) -> list[_Piece]:
    """Pieces of a human message. `lead` is the text joining it to the role tag."""
    split = _split_marker(text)
    if split is None:
        return [_Piece("text", lead + text)] if (lead + text) else []
    if not allow_image:
        raise ValueError("the media marker must be in the first human turn")
    before, after = split
    pieces = [_Piece("text", lead + before, trimmable=True)] if before else []
    pieces.append(_Piece("image"))
    if after:
        pieces.append(_Piece("text", after))
    return pieces


def _special(tokenizer: Tokenizer, token: str, template: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"template {template!r} needs the token {token!r}, which {tokenizer} lacks")
    return i


def _pieces(tokenizer: Tokenizer, turns: list[tuple[str, str]], template: str,
            system: str | None, add_generation_prompt: bool) -> list[_Piece]:
    """The prompt of `turns` in `template` as a list of pieces."""
    out: list[_Piece] = []
    if template == "vicuna_v1":
        out += [_Piece("id", tokenizer.bos_id), _Piece("text", VICUNA_SYSTEM if system is None else system)]
        for i, (role, text) in enumerate(turns):
            if role == HUMAN:
                # " " joins the system prompt; after "</s>" nothing does.
                tag = " USER:" if i == 0 else "USER:"
                split = _split_marker(text)
                if split is not None and not split[0]:
                    # "USER: <image>": LLaVA's chunk ends with the space.
                    out.append(_Piece("text", tag + " "))
                    out += _human_content(text, "", allow_image=i == 0)
                else:
                    out.append(_Piece("text", tag))
                    out += _human_content(text, " ", allow_image=i == 0)
            else:
                out.append(_Piece("text", " ASSISTANT:"))
                out.append(_Piece("text", " " + text, supervised=True))
                out.append(_Piece("id", tokenizer.eos_id, supervised=True))
        if add_generation_prompt:
            out.append(_Piece("text", " ASSISTANT:"))
    elif template == "llama_3_1":
        start = _special(tokenizer, "<|start_header_id|>", template)
        end = _special(tokenizer, "<|end_header_id|>", template)
        eot = _special(tokenizer, "<|eot_id|>", template)

        def header(role: str) -> list[_Piece]:
            return [_Piece("id", start), _Piece("text", role), _Piece("id", end)]

        out += [_Piece("id", tokenizer.bos_id)] + header("system")
        out += [_Piece("text", "\n\n" + (LLAMA3_SYSTEM if system is None else system)), _Piece("id", eot)]
        for i, (role, text) in enumerate(turns):
            if role == HUMAN:
                out += header("user")
                if _split_marker(text) is not None and text.startswith(tuple(MEDIA_MARKERS)):
                    out.append(_Piece("text", "\n\n"))
                    out += _human_content(text, "", allow_image=i == 0)
                else:
                    out += _human_content(text, "\n\n", allow_image=i == 0)
                out.append(_Piece("id", eot))
            else:
                out += header("assistant") + [_Piece("text", "\n\n")]
                out.append(_Piece("text", text, supervised=True))
                out.append(_Piece("id", eot, supervised=True))
        if add_generation_prompt:
            out += header("assistant") + [_Piece("text", "\n\n")]
    elif template == "plain":
        # Stage-1 captioning: the first human turn only contributes the marker.
        out.append(_Piece("id", tokenizer.bos_id))
        if turns and _split_marker(turns[0][1]) is not None:
            out.append(_Piece("image"))
        answer = next((text for role, text in turns if role == GPT), None)
        if answer is not None:
            out.append(_Piece("text", answer, supervised=True))
            out.append(_Piece("id", tokenizer.eos_id, supervised=True))
        elif not add_generation_prompt:
            raise ValueError("plain template needs an assistant turn (the caption)")
    else:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    return out


def _encode_pieces(tokenizer: Tokenizer, pieces: list[_Piece]):
    """ids, labels, fuse mask, image position and the trimmable span before it.

    The fuse mask marks instruction tokens (every role but the assistant's
    answers, the image placeholder excluded): the text pre-fusion may read.
    It comes from the conversation roles, so training and inference agree.
    """
    prefix_space = tokenizer.adds_prefix_space
    ids: list[int] = []
    labels: list[int] = []
    fuse: list[bool] = []
    image_pos = -1
    trim_start = -1
    for piece in pieces:
        if piece.kind == "id":
            new = [int(piece.value)]
        elif piece.kind == "image":
            image_pos = len(ids)
            new = [IMAGE_TOKEN_ID]
        else:
            text = piece.value
            if prefix_space and text.startswith(" "):
                text = text[1:]  # the dummy prefix `▁` stands for this space
            new = tokenizer.encode(text) if text else []
            if piece.trimmable:
                trim_start = len(ids)
        ids += new
        labels += new if piece.supervised else [IGNORE_INDEX] * len(new)
        fuse += [piece.kind != "image" and not piece.supervised] * len(new)
    if image_pos < 0:
        trim_start = -1
    return ids, labels, fuse, image_pos, trim_start


def encode_conversation(tokenizer: Tokenizer, conversations: Sequence[Mapping[str, Any]],
                        template: str, max_len: int, *, system: str | None = None) -> dict[str, Any]:
    """Tokenises a LLaVA conversation for training.

    Args:
      tokenizer: a `mmlm.data.tokenizer.Tokenizer`.
      conversations: LLaVA turns `[{"from": "human"|"gpt", "value": str}, ...]`;
        at most one `<image>` (or `<video>`) marker, in the first human turn.
      template: "vicuna_v1", "llama_3_1" or "plain".
      max_len: maximum number of ids (text tokens plus the one placeholder).
      system: overrides the template's system prompt.

    Returns:
      dict with
        input_ids: int32 (L,), L <= max_len, unpadded; IMAGE_TOKEN_ID at the
          placeholder;
        labels: int32 (L,), IGNORE_INDEX except answer and end-of-turn tokens;
        fuse_mask: bool (L,), True at instruction tokens (what pre-fusion reads:
          not the placeholder, not the assistant's answers);
        image_pos: index of the placeholder in input_ids, or -1;
        truncated: True if the conversation was longer than max_len;
        num_tokens: length before truncation.

    Truncation keeps the first max_len ids but never cuts the placeholder: if
    it would fall outside, the instruction text right before it (in the same
    turn) is dropped first; if even that cannot make room, ValueError.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    turns = normalize_turns(conversations)
    ids, labels, fuse, image_pos, trim_start = _encode_pieces(
        tokenizer, _pieces(tokenizer, turns, template, system, add_generation_prompt=False))
    num_tokens = len(ids)
    truncated = num_tokens > max_len
    if truncated:
        if image_pos >= max_len:
            need = image_pos - (max_len - 1)
            if trim_start < 0 or image_pos - trim_start < need:
                raise ValueError(
                    f"max_len={max_len} cannot hold the prompt up to the image placeholder "
                    f"(at position {image_pos}); increase max_text_len")
            del ids[trim_start:trim_start + need]
            del labels[trim_start:trim_start + need]
            del fuse[trim_start:trim_start + need]
            image_pos -= need
        ids, labels, fuse = ids[:max_len], labels[:max_len], fuse[:max_len]
    return {
        "input_ids": np.asarray(ids, np.int32),
        "labels": np.asarray(labels, np.int32),
        "fuse_mask": np.asarray(fuse, bool),
        "image_pos": int(image_pos),
        "truncated": bool(truncated),
        "num_tokens": int(num_tokens),
    }


def encode_prompt(tokenizer: Tokenizer, question: str, template: str, has_image: bool, *,
                  history: Iterable[tuple[str, str]] = (), system: str | None = None,
                  return_fuse_mask: bool = False) -> list[int] | tuple[list[int], list[bool]]:
    """Prompt ids for inference, ending right where the assistant answer starts.

    Args:
      question: the user's question. With `has_image` and no `<image>` marker
        in it (or in the first history question), the placeholder goes first,
        followed by "\\n", as in LLaVA.
      has_image: whether the sample has media (image or video).
      history: earlier (question, answer) pairs of a multi-turn chat.
      return_fuse_mask: also return the fuse mask (see `encode_conversation`):
        the history's answers are response tokens, not fused, as in training.
    Returns:
      ids with one IMAGE_TOKEN_ID if `has_image` (and the fuse mask).
    """
    pairs = [(q, a) for q, a in history]
    questions = [q for q, _ in pairs] + [question]
    markers = sum(count_markers(q) for q in questions)
    if has_image and markers == 0:
        if pairs:
            pairs[0] = (IMAGE_MARKER + "\n" + pairs[0][0], pairs[0][1])
        else:
            question = IMAGE_MARKER + "\n" + question
    elif not has_image and markers:
        raise ValueError("the prompt contains an <image> marker but has_image is False")
    turns: list[dict[str, str]] = []
    for q, a in pairs:
        turns += [{"from": HUMAN, "value": q}, {"from": GPT, "value": a}]
    turns.append({"from": HUMAN, "value": question})
    ids, _, fuse, _, _ = _encode_pieces(
        tokenizer, _pieces(tokenizer, normalize_turns(turns), template, system, add_generation_prompt=True))
    return (ids, fuse) if return_fuse_mask else ids


def stop_token_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Ids that end an assistant answer in `template` (for generation)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    stops = [tokenizer.eos_id]
    if template == "llama_3_1":
        for token in ("<|eot_id|>", "<|end_of_text|>"):
            i = tokenizer.token_to_id(token)
            if i is not None and i not in stops:
                stops.append(i)
    return stops
