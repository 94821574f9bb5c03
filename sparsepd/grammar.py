"""Grammars for structured output, compiled against a model's vocabulary (xgrammar): shared by the router,
which compiles a request's grammar to refuse a bad one before any worker does work, and the engine, which
matches each request's tokens against it (engine/grammar.py).

A `Grammar` is a kind and a text: `json_schema` (a JSON Schema document; `{"type": "object"}` and the like
for OpenAI's `json_object`), `regex`, `ebnf` (GBNF: `root ::= ...`, as llama.cpp and SGLang take it) or
`structural_tag` (xgrammar's JSON form, or SGLang's older `{"structures": [...], "triggers": [...]}`).
JSON is generated on one line with the separators ", " and ": " (json.dumps's): no free whitespace, so a
model cannot loop on newlines and the output's layout is predictable; properties come in the schema's order.

The vocabulary comes from a tokenizer.json (byte-level, byte-fallback or raw vocabularies; xgrammar detects
which) or, when there is none, is the byte vocabulary of the embedded presets (id i < 256 is byte i). Its size
is the MODEL's vocab_size: ids past the tokenizer's, and the tokenizer's special tokens, are never allowed by
a grammar, except the model's EOS id, the grammar's one stop token.

`Grammars` compiles with a cache keyed by (kind, text), least recently used out past `cache_size`
entries; a grammar that does not compile raises ValueError with the compiler's message. xgrammar (and the
torch and transformers it imports: seconds) is imported on first use, so a process that never sees a
grammar never pays for it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GrammarKind = Literal["json_schema", "regex", "ebnf", "structural_tag"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "regex", "ebnf", "structural_tag")
MAX_GRAMMAR_CHARS = 1 << 20


class Grammar(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: GrammarKind
    text: str = Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)


class Vocabulary(BaseModel):
    """What a grammar is compiled against: the model's vocab_size and EOS id, and its tokenizer.json text (None:
    the byte vocabulary)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(ge=1)
    eos_id: int = Field(ge=0)
    tokenizer_json: str | None = None

    def tokenizer_info(self) -> Any:
        """The xgrammar.TokenizerInfo of this vocabulary (raises ValueError when the tokenizer does not fit)."""
        import xgrammar as xgr

        if self.eos_id >= self.vocab_size:
            raise ValueError(f"eos_id={self.eos_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.tokenizer_json is None:
            raw = [bytes([i]) if i < 256 else b"" for i in range(self.vocab_size)]  # b"": a special token
            return xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=[self.eos_id])
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self.tokenizer_json))
        vocab = hf.get_vocab()
        if max(vocab.values()) >= self.vocab_size:
            raise ValueError(f"the tokenizer has ids up to {max(vocab.values())}, past the model's vocab_size="
                             f"{self.vocab_size}")
        # xgrammar's detection of the vocabulary's encoding (byte-level, byte-fallback, raw), then the same
        # vocabulary with the special tokens blanked: xgrammar never allows an empty token, while it would
        # take "<|begin_of_text|>" for text a JSON string may hold.
        detected = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size, stop_token_ids=[self.eos_id])
        special = {t["id"] for t in json.loads(self.tokenizer_json).get("added_tokens", []) if t.get("special")}
        encoded = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            encoded[i] = "" if i in special else token
        return xgr.TokenizerInfo(encoded, detected.vocab_type, vocab_size=self.vocab_size,
                                 stop_token_ids=[self.eos_id], add_prefix_space=detected.add_prefix_space)


class Grammars:
    """Compiles grammars against one vocabulary, each once (an LRU cache of `cache_size` compiled grammars).
    Thread-safe: the router's executor threads and a worker's engine and control threads share one."""

    def __init__(self, vocabulary: Vocabulary, cache_size: int = 256, max_threads: int = 4):
        if cache_size < 1:
            raise ValueError(f"cache_size must be ≥ 1, got {cache_size}")
        self.vocabulary, self.cache_size, self.max_threads = vocabulary, cache_size, max_threads
        self._compiler = None  # xgrammar.GrammarCompiler, built on first use
        self._info = None
        self._cache: OrderedDict[Grammar, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses that compiled)

    @property
    def tokenizer_info(self) -> Any:
        self._ensure_compiler()
        return self._info

    def compile(self, grammar: Grammar) -> Any:
        """The xgrammar.CompiledGrammar of `grammar`; ValueError naming the kind with the compiler's message."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        compiler = self._ensure_compiler()
        try:
            compiled = _compile(compiler, grammar)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors derive from these
            raise ValueError(f"{grammar.kind} does not compile: {_message(exc)}") from None
        with self._lock:
            self.compiled += 1
            self._cache[grammar] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _ensure_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                self._info = self.vocabulary.tokenizer_info()
                # xgrammar's own cache off: ours is keyed by the request's text and bounded by count
                self._compiler = xgr.GrammarCompiler(self._info, max_threads=self.max_threads, cache_enabled=False)
            return self._compiler


def _compile(compiler: Any, grammar: Grammar) -> Any:
    if grammar.kind == "json_schema":
        return compiler.compile_json_schema(grammar.text, any_whitespace=False)
    if grammar.kind == "regex":
        return compiler.compile_regex(grammar.text)
    if grammar.kind == "ebnf":
        return compiler.compile_grammar(grammar.text)
    return compiler.compile_structural_tag(_structural_tag(grammar.text))


def _structural_tag(text: str) -> str:
    """xgrammar's structural tag JSON; SGLang's older form ({"structures": [{"begin", "schema", "end"}],
    "triggers": [...]}) converted to it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not (isinstance(data, dict) and "structures" in data):
        return text
    import xgrammar as xgr

    try:
        tags = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                for s in data["structures"]]
        return xgr.StructuralTag.from_legacy_structural_tag(tags, list(data.get("triggers", []))).model_dump_json()
    except (KeyError, TypeError) as exc:
        raise ValueError(f"structures must be a list of {{begin, schema, end}} objects ({exc!r})") from None


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _message(exc: BaseException) -> str:
    """The compiler's message without its log prefix ("[12:00:00] file.cc:94: Check failed: … is false: ")."""
    text = _LOG_PREFIX.sub("", str(exc).strip()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + "…"
