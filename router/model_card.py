"""What the router knows about the model it serves, without loading it: sizes, special ids, the context
length, and the tokenizer files it hands to clients (GetTokenizer) and uses itself (`original_text`,
stop strings); text becomes ids by the rule of sparsepd/prompt_encoding.py.

A card comes from a checkpoint directory (its `config.json`, and `tokenizer.json` /
`tokenizer_config.json` when present) or from a preset (`PRESETS`: the numbers of the floor's preset table,
sparsepd/model_config.py). The `tiny` preset ships real Hugging Face tokenizer files under
`router/models/tiny/` (byte-level: id i < 256 is byte i), written by `write_byte_level_files`; a test
regenerates them and compares bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from sparsepd.model_config import PRESETS as MODEL_PRESETS
from sparsepd.prompt_encoding import PromptEncoder

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class PresetInfo:
    vocab_size: int
    max_seq_len: int
    bos_id: int
    eos_id: int
    page_size: int


PRESETS: dict[str, PresetInfo] = {
    name: PresetInfo(vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                     page_size=cfg.page_size)
    for name, cfg in MODEL_PRESETS.items()
}

MODEL_TYPE = "sparsepd"
ARCHITECTURE = "SparsepdDeepseekV4ForCausalLM"
# A plain chat format for models without one of their own: one line per message, then the assistant's tag.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
BYTE_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")


@dataclass(frozen=True)
class ModelCard:
    served_model_name: str
    model_path: str
    vocab_size: int
    max_context_length: int
    bos_id: int
    eos_id: int
    page_size: int
    # tokenizer.json, tokenizer_config.json (its chat_template), config.json, and chat_template.jinja when the
    # checkpoint keeps its template in a file of its own (transformers' newer layout)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.json" in self.files

    def load_tokenizer(self):
        """The `tokenizers.Tokenizer` of this card, or None when it has no tokenizer.json."""
        if not self.has_tokenizer:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.files["tokenizer.json"].decode())

    def prompt_encoder(self) -> PromptEncoder | None:
        """Text to prompt ids by the tokenizer's own special-token rule (sparsepd/prompt_encoding.py), or None
        when the card has no tokenizer.json."""
        return PromptEncoder.from_files(self.files, f"{self.model_path}: ")

    def tokenizer_zip(self) -> bytes:
        """The card's files as one zip archive (deterministic bytes: fixed timestamps and order)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(self.files):
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, self.files[name])
        return buf.getvalue()

    def tokenizer_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer_zip()).hexdigest()


def card_for(preset: str = "tiny", checkpoint: str | None = None, served_model_name: str | None = None) -> ModelCard:
    """The card of a checkpoint directory (when given) or of a preset."""
    if checkpoint is not None:
        return _card_from_directory(Path(checkpoint), served_model_name)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    info = PRESETS[preset]
    files = _read_files(MODELS_DIR / preset) if (MODELS_DIR / preset).is_dir() else {}
    if not files:
        files = {"config.json": _dump(_hf_config(preset, info))}
    return ModelCard(served_model_name or f"sparsepd/{preset}", f"preset:{preset}", info.vocab_size,
                     info.max_seq_len, info.bos_id, info.eos_id, info.page_size, files)


def _card_from_directory(directory: Path, served_model_name: str | None) -> ModelCard:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"checkpoint {directory} has no config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    ours = data.get("sparsepd", {})
    preset = PRESETS.get(ours.get("name", ""))
    try:
        vocab = int(ours.get("vocab_size", data.get("vocab_size")))
        max_len = int(ours.get("max_seq_len", data.get("max_position_embeddings")))
        bos = int(ours.get("bos_id", data.get("bos_token_id", preset.bos_id if preset else 0)))
        eos = int(ours.get("eos_id", data.get("eos_token_id", preset.eos_id if preset else 1)))
        page = int(ours.get("page_size", preset.page_size if preset else 128))
    except (TypeError, ValueError):
        raise ValueError(f"{path} lacks vocab_size / max_seq_len (or max_position_embeddings)") from None
    files = _read_files(directory)
    if "tokenizer.json" in files and "tokenizer_config.json" not in files:
        files["tokenizer_config.json"] = _dump(_tokenizer_config(None, None, max_len))
    name = served_model_name or directory.resolve().name
    return ModelCard(name, str(directory.resolve()), vocab, max_len, bos, eos, page, files)


def _read_files(directory: Path) -> dict[str, bytes]:
    names = ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja")
    return {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _hf_config(name: str, info: PresetInfo) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "_name_or_path": f"sparsepd/{name}",
            "vocab_size": info.vocab_size, "max_position_embeddings": info.max_seq_len,
            "bos_token_id": info.bos_id, "eos_token_id": info.eos_id, "torch_dtype": "float32"}


def _tokenizer_config(bos: str | None, eos: str | None, max_len: int, pad: str | None = None,
                      add_specials: bool | None = None) -> dict:
    """add_specials: add_bos_token and add_eos_token (None: left out, so tokenizer.json's post-processor decides
    what a text gets, sparsepd/prompt_encoding.py)."""
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "model_max_length": max_len,
              "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if add_specials is not None:
        config |= {"add_bos_token": add_specials, "add_eos_token": add_specials}
    return config


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): printable bytes map to themselves, the rest to code points ≥ 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_byte_level_files(directory: Path, name: str) -> None:
    """Write tokenizer.json (id i < 256 is byte i; BOS, EOS and a pad token after them), tokenizer_config.json
    (with a chat template) and config.json for a preset with a byte vocabulary. A text gets no special token
    (no post-processor, add_bos_token false): the rule every path follows, the SGLang gateway's included,
    which encodes a completion's text without any (sparsepd/prompt_encoding.py); the chat template begins
    with the BOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    info = PRESETS[name]
    specials = {info.bos_id: BYTE_SPECIALS[0], info.eos_id: BYTE_SPECIALS[1]}
    for i in range(256, info.vocab_size):
        specials.setdefault(i, BYTE_SPECIALS[2] if BYTE_SPECIALS[2] not in specials.values() else f"<|unused_{i}|>")
    vocab = {ch: b for b, ch in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
    bos = specials[info.bos_id]
    ids = {specials[i]: tok.token_to_id(specials[i]) for i in specials}
    if any(ids[s] != i for i, s in specials.items()):
        raise ValueError(f"special token ids came out as {ids}, expected {specials}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    (directory / "tokenizer_config.json").write_bytes(
        _dump(_tokenizer_config(bos, specials[info.eos_id], info.max_seq_len, pad=BYTE_SPECIALS[2],
                                add_specials=False)))
    (directory / "config.json").write_bytes(_dump(_hf_config(name, info)))


if __name__ == "__main__":  # regenerate the shipped files: python -m sparsepd.router.model_card
    write_byte_level_files(MODELS_DIR / "tiny", "tiny")
