"""Text to prompt ids: one rule on every path that turns a prompt's text into token ids (the router's
`original_text`, `sparsepd generate` as a client and with --local, the load test's text prompts), so the same
text gives the same ids whichever API a user picks.

The rule: the tokenizer's encoding of the text without special tokens, with the special tokens the
tokenizer's own configuration puts around a text: `tokenizer_config.json`'s `add_bos_token` /
`add_eos_token` (naming its `bos_token` / `eos_token`) when it sets them, else what `tokenizer.json`'s
post-processor adds to a single sequence. A special token the text's encoding already starts (or ends)
with is not added again (a text that spells out its BOS gets one BOS, not two).

The SGLang gateway (smg 1.13) encodes a /v1/completions prompt, and /generate's `text`, itself, always
without special tokens, and sends only the ids (its source: "raw text generation uses text as-is"; a text-only
request "sends the ids alone"); a chat gets its specials from the chat template. So the gateway agrees with
this rule only for a tokenizer whose configuration adds none, as the shipped byte-level one
(router/models/tiny: `add_bos_token` false; its chat template starts with the BOS). For a checkpoint whose
configuration adds a BOS, a gateway completion lacks it unless the prompt spells it out (README, API).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROBE = "a"  # a text every tokenizer encodes to at least one id, to see what the post-processor adds


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """The ids the rule puts before and after a text's encoding."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def around(self, ids: Sequence[int]) -> list[int]:
        """`ids` with the prefix before and the suffix after, each unless already there."""
        out = list(ids)
        if self.prefix and tuple(out[:len(self.prefix)]) != self.prefix:
            out = [*self.prefix, *out]
        if self.suffix and (len(out) < len(self.suffix) or tuple(out[-len(self.suffix):]) != self.suffix):
            out = [*out, *self.suffix]
        return out


class PromptEncoder:
    """The rule for one tokenizer: `encode(text)`; `tokenizer` (a `tokenizers.Tokenizer`) decodes."""

    def __init__(self, tokenizer, config: Mapping | None = None, source: str = "tokenizer_config.json"):
        """tokenizer: a `tokenizers.Tokenizer`; config: the parsed tokenizer_config.json (None: none)."""
        self.tokenizer = tokenizer
        self.specials = special_tokens(tokenizer, config or {}, source)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], source: str = "") -> PromptEncoder | None:
        """From a model's tokenizer files by name (the router's model card, GetTokenizer's archive); None
        without a tokenizer.json."""
        if "tokenizer.json" not in files:
            return None
        from tokenizers import Tokenizer

        config = _parse_config(files.get("tokenizer_config.json"), f"{source}tokenizer_config.json")
        return cls(Tokenizer.from_str(files["tokenizer.json"].decode()), config, f"{source}tokenizer_config.json")

    @classmethod
    def from_directory(cls, directory: str | Path) -> PromptEncoder | None:
        directory = Path(directory)
        names = ("tokenizer.json", "tokenizer_config.json")
        return cls.from_files({n: (directory / n).read_bytes() for n in names if (directory / n).is_file()},
                              f"{directory}/")

    def encode(self, text: str) -> list[int]:
        return self.specials.around(self.tokenizer.encode(text, add_special_tokens=False).ids)


def special_tokens(tokenizer, config: Mapping, source: str = "tokenizer_config.json") -> SpecialTokens:
    """What goes around a text: per side, the config's add_bos_token / add_eos_token when it is a boolean,
    else what the tokenizer's post-processor adds to a single sequence."""
    raw = tokenizer.encode(PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(PROBE, add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(raw) + 1) if full[i:i + len(raw)] == raw), None)
    if start is None:
        raise ValueError(f"the tokenizer's post-processor changes the text's own ids ({raw} became {full}); "
                         "expected it to add special tokens around them")
    sides = {"bos": tuple(full[:start]), "eos": tuple(full[start + len(raw):])}
    for side in ("bos", "eos"):
        flag = config.get(f"add_{side}_token")
        if isinstance(flag, bool):
            sides[side] = (_token_id(tokenizer, config, side, source),) if flag else ()
    return SpecialTokens(prefix=sides["bos"], suffix=sides["eos"])


def _token_id(tokenizer, config: Mapping, side: str, source: str) -> int:
    token = config.get(f"{side}_token")
    text = token.get("content") if isinstance(token, dict) else token
    token_id = tokenizer.token_to_id(text) if isinstance(text, str) else None
    if token_id is None:
        raise ValueError(f"{source}: add_{side}_token is true but {side}_token={token!r} is not a token of "
                         "tokenizer.json")
    return token_id


def _parse_config(data: bytes | None, source: str) -> dict:
    if data is None:
        return {}
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source} holds {type(config).__name__}, expected a JSON object")
    return config
