"""Tokenizers: byte-level with BOS/EOS ids for the embedded presets, `tokenizer.json` (HF tokenizers) for
checkpoints that carry one. A checkpoint's tokenizer must fit the model: no more tokens than its
vocabulary, and the BOS/EOS tokens `tokenizer_config.json` names at the ids config.json gives. `encode` gives
a prompt's ids by the rule every serving path follows (sparsepd/prompt_encoding.py). (The chat template in
tokenizer_config.json is the router's business: it hands the file to clients.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from sparsepd.model_config import ModelConfig
from sparsepd.prompt_encoding import PromptEncoder


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token i < 256 is byte i; `bos_id` and `eos_id` are the specials; other ids decode to nothing. A text
    gets no special token, as with the byte-level tokenizer files the router serves (router/models/tiny)."""

    def __init__(self, vocab_size: int, bos_id: int, eos_id: int):
        if vocab_size < 256 or bos_id < 256 or eos_id < 256:
            raise ValueError(f"a byte tokenizer needs vocab_size ≥ 258 and specials ≥ 256, got "
                             f"vocab_size={vocab_size} bos_id={bos_id} eos_id={eos_id}")
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` loaded through the `tokenizers` package; `specials` maps "bos"/"eos" to the token
    text tokenizer_config.json gives, checked against the model's ids. A text's special tokens follow the
    tokenizer's own configuration (sparsepd/prompt_encoding.py), as on every serving path."""

    def __init__(self, path: Path, cfg: ModelConfig, specials: dict[str, str] | None = None):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:  # optional dependency: only checkpoints with a tokenizer.json need it
            raise RuntimeError(f"{path} needs the 'tokenizers' package: pip install tokenizers") from exc
        self._tok = _HF.from_file(str(path))
        config = path.parent / "tokenizer_config.json"
        self._rule = PromptEncoder(self._tok, json.loads(config.read_text()) if config.is_file() else None,
                                   str(config))
        self.vocab_size, self.bos_id, self.eos_id = cfg.vocab_size, cfg.bos_id, cfg.eos_id
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if size > cfg.vocab_size:
            raise ValueError(f"{path} has {size} tokens, more than the model's vocab_size={cfg.vocab_size}")
        for role, want in (("bos", cfg.bos_id), ("eos", cfg.eos_id)):
            text = (specials or {}).get(role)
            if text is not None and self._tok.token_to_id(text) != want:
                raise ValueError(f"{path}: the {role} token {text!r} has id {self._tok.token_to_id(text)}, but the "
                                 f"model's config says {role}_token_id={want}")

    def encode(self, text: str) -> list[int]:
        return self._rule.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(cfg: ModelConfig, checkpoint: str | Path | None = None) -> Tokenizer:
    """The checkpoint's tokenizer.json when it has one, else a byte tokenizer with the config's specials."""
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").exists():
        return HFTokenizer(Path(checkpoint) / "tokenizer.json", cfg, _special_tokens(Path(checkpoint)))
    return ByteTokenizer(cfg.vocab_size, cfg.bos_id, cfg.eos_id)


def _special_tokens(directory: Path) -> dict[str, str]:
    """{"bos": text, "eos": text} from tokenizer_config.json (a token is a string or {"content": text})."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    out = {}
    for role in ("bos", "eos"):
        token = data.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            out[role] = token
    return out
