"""Tokenizers behind one small interface.

Two backends:

* `SentencePieceTokenizer`: a sentencepiece `tokenizer.model` (LLaMA-2,
  Vicuna v1.5, and the tiny demo tokenizer shipped in `data/`);
* `HFTokenizer`: a Hugging Face `tokenizer.json` read with the `tokenizers`
  library (LLaMA-3 / 3.1). Which ids are BOS/EOS/PAD comes from the
  `tokenizer_config.json` / `special_tokens_map.json` next to it when present.

`load_tokenizer(path)` picks the backend from the path. Tokenizer objects
pickle by path, so grain worker processes re-open the model file instead of
shipping it.

Conventions shared by both backends:

* `encode(text)` never adds special tokens except BOS when `add_bos=True`;
* `decode(ids)` skips negative ids (the `<image>` placeholder -200 and the
  label ignore value -100), so decoding `input_ids` or `labels` just works;
* `adds_prefix_space` tells the conversation templates whether the tokenizer
  encodes a word at the start of a chunk as if a space preceded it
  (sentencepiece's dummy prefix `▁`), see `mmlm.data.templates`.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmlm.errors import UserError

# Shipped assets live in the repository's top-level `data/` directory (an
# editable install keeps it next to the package). MMLM_ASSETS_DIR overrides.
ASSETS_DIR = Path(os.environ.get("MMLM_ASSETS_DIR", Path(__file__).resolve().parents[2] / "data"))
# The tiny sentencepiece model trained on the synthetic corpus (see
# `mmlm.data.make_tokenizer`); it covers every word the synthesisers emit.
TINY_TOKENIZER_PATH = ASSETS_DIR / "tiny_tokenizer.model"


class Tokenizer(abc.ABC):
    """Minimal tokenizer interface used by templates, the pipeline and chat."""

    path: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the embedding table needs at least this many rows)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """End-of-sequence id (the end-of-turn id for chat tokenizers)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id used to right-pad `input_ids` (never attended, never supervised)."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` prepends `bos_id`."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Backend decode of non-negative ids."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. `<|eot_id|>`), or None if absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """Vocabulary entry of an id."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping negative ids (placeholders, ignore labels)."""
        return self._decode([int(i) for i in ids if int(i) >= 0])

    @property
    def adds_prefix_space(self) -> bool:
        """True if a chunk's first word is encoded as if preceded by a space.

        sentencepiece models (and HF `Metaspace` tokenizers) do this with the
        `▁` dummy prefix; byte-level BPE (LLaMA-3) does not.
        """
        ids = self.encode("a")
        return bool(ids) and self.id_to_token(ids[0]).startswith("\u2581")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file (LLaMA-2 / Vicuna / the tiny demo model)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        unk = self._sp.unk_id()
        # LLaMA's model has no pad piece (pad_id() == -1); LLaVA pads with unk.
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else max(unk, 0)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._pad)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self._sp.encode(text))
        return [self.bos_id] + ids if add_bos else ids

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = int(self._sp.piece_to_id(token))
        # piece_to_id maps unknown pieces to unk; only a real match counts.
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def _special_token_text(value: Any) -> str | None:
    """`tokenizer_config.json` stores tokens as strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (LLaMA-3 / 3.1 and other fast tokenizers).

    BOS/EOS/PAD come from `tokenizer_config.json` or `special_tokens_map.json`
    in the same directory; without them, well-known LLaMA token strings are
    looked up. PAD falls back to UNK, then to EOS (padding is masked anyway).
    """

    _BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>")
    _EOS_GUESSES = ("<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>")
    _PAD_GUESSES = ("<|finetune_right_pad_id|>", "<pad>", "<unk>")

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        self._tok = _HFTok.from_file(self.path)
        self._tok.no_padding()
        self._tok.no_truncation()
        specials = self._read_special_tokens(Path(self.path).parent)
        self._bos = self._resolve(specials.get("bos_token"), self._BOS_GUESSES, "BOS")
        self._eos = self._resolve(specials.get("eos_token"), self._EOS_GUESSES, "EOS")
        pad = specials.get("pad_token") or specials.get("unk_token")
        try:
            self._pad = self._resolve(pad, self._PAD_GUESSES, "PAD")
        except ValueError:
            self._pad = self._eos

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    @staticmethod
    def _read_special_tokens(directory: Path) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = directory / name
            if not f.is_file():
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {f}: {e}") from None
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                text = _special_token_text(data.get(key))
                if text is not None:
                    found[key] = text  # tokenizer_config.json (read last) wins
        return found

    def _resolve(self, configured: str | None, guesses: Sequence[str], what: str) -> int:
        candidates = ([configured] if configured else []) + list(guesses)
        for token in candidates:
            i = self._tok.token_to_id(token)
            if i is not None:
                return int(i)
        raise ValueError(
            f"{self.path}: cannot find the {what} token (tried {candidates}); add a "
            f"tokenizer_config.json with '{what.lower()}_token' next to it")

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return [self.bos_id] + ids if add_bos else ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"id {token_id} is outside the vocabulary of {self.path}")
        return token


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Opens a tokenizer.

    Args:
      path: a sentencepiece `.model` file, a HF `tokenizer.json`, or a
        directory holding one of them (`tokenizer.model` is preferred when
        both exist, as for LLaMA-2 checkpoints). None or "" (or "tiny") gives
        the tiny demo tokenizer shipped in `data/`.

    Returns:
      A `Tokenizer` with `.encode`, `.decode`, `.bos_id`, `.eos_id`,
      `.pad_id`, `.vocab_size`.
    """
    if path is None or str(path) in ("", "tiny"):
        path = TINY_TOKENIZER_PATH
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.model").is_file():
            p = p / "tokenizer.model"
        elif (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        else:
            raise TokenizerMissingError(
                f"tokenizer directory {str(path)!r} has neither tokenizer.model nor tokenizer.json")
    if not p.is_file():
        raise TokenizerMissingError(f"tokenizer file {str(path)!r} does not exist")
    if p.suffix not in (".json", ".model"):
        raise TokenizerError(
            f"unsupported tokenizer file {str(p)!r}: expected a sentencepiece .model or a tokenizer.json")
    try:
        return HFTokenizer(p) if p.suffix == ".json" else SentencePieceTokenizer(p)
    except Exception as e:  # noqa: BLE001 - sentencepiece / tokenizers raise RuntimeError, Exception, ...
        raise TokenizerError(f"tokenizer file {str(p)!r} is damaged or not a "
                             f"{'tokenizer.json' if p.suffix == '.json' else 'sentencepiece model'} "
                             f"({type(e).__name__}: {str(e).strip()[:200]})") from None


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be opened: the wrong kind of file, or damaged."""


class TokenizerMissingError(UserError, FileNotFoundError):
    """A tokenizer path that does not exist."""
