"""The requests of a load test: random token-id prompts of seeded lengths, or prompts from a JSONL file, and
their arrival times (Poisson with a seeded generator, or all at once). Same seed, same workload."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsepd.loadtest.config import LengthRange


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request: token ids (or text for the router to tokenize) and how many tokens to generate."""

    input_ids: tuple[int, ...] | None
    text: str | None
    output_len: int

    @property
    def input_len(self) -> int | None:
        return None if self.input_ids is None else len(self.input_ids)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the workload needs to know of the served model (from GetModelInfo)."""

    vocab_size: int
    max_context_length: int
    special_ids: frozenset[int]  # eos, bos, pad: kept out of random prompts


def random_prompts(n: int, input_len: LengthRange, output_len: LengthRange, model: ModelFacts,
                   seed: int) -> list[Prompt]:
    """`n` prompts of uniform random token ids (never a special id), lengths uniform in the ranges."""
    need = input_len.high + output_len.high
    if need > model.max_context_length:
        raise ValueError(f"--input-len {input_len} plus --output-len {output_len} can reach {need} tokens; the "
                         f"model's context length is {model.max_context_length}")
    allowed = allowed_ids(model)
    rng = np.random.default_rng([seed, 0])
    inputs = rng.integers(input_len.low, input_len.high + 1, size=n)
    outputs = rng.integers(output_len.low, output_len.high + 1, size=n)
    return [Prompt(tuple(allowed[rng.integers(0, len(allowed), size=int(k))].tolist()), None, int(m))
            for k, m in zip(inputs, outputs, strict=True)]


def allowed_ids(model: ModelFacts) -> np.ndarray:
    """The ids random prompts draw from: the whole vocabulary but eos, bos and pad."""
    return np.setdiff1d(np.arange(model.vocab_size), np.fromiter(model.special_ids, dtype=np.int64))


def file_prompts(path: str, n: int, output_len: LengthRange, seed: int) -> list[Prompt]:
    """`n` prompts from a JSONL file, in file order (cycling when it has fewer). Each line is an object with
    `input_ids` (a list of token ids) or `prompt` (text, tokenized by the router), and optionally
    `output_len`; lines without it draw one from `output_len` with the seed."""
    rows = _read_rows(path)
    rng = np.random.default_rng([seed, 1])
    drawn = rng.integers(output_len.low, output_len.high + 1, size=n)
    return [_prompt(rows[i % len(rows)], int(drawn[i])) for i in range(n)]


def _read_rows(path: str) -> list[tuple[int, dict]]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--dataset {path!r}: no such file")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"--dataset {path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not (_is_ids(row.get("input_ids")) or isinstance(row.get("prompt"), str)):
            raise ValueError(f"--dataset {path}:{number}: expected an object with \"input_ids\" (a non-empty list of "
                             "token ids) or \"prompt\" (text)")
        out = row.get("output_len")
        if out is not None and (not isinstance(out, int) or isinstance(out, bool) or out < 1):
            raise ValueError(f"--dataset {path}:{number}: output_len={out!r}, expected an integer ≥ 1")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"--dataset {path!r} holds no prompt")
    return rows


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and v >= 0 for v in value)


def _prompt(numbered: tuple[int, dict], drawn_output_len: int) -> Prompt:
    _, row = numbered
    output_len = row.get("output_len") or drawn_output_len
    if _is_ids(row.get("input_ids")):
        return Prompt(tuple(row["input_ids"]), None, output_len)
    return Prompt(None, row["prompt"], output_len)


def arrival_offsets_s(n: int, request_rate: float, seed: int, point: int) -> np.ndarray:
    """When each request arrives, in seconds from the start of the point: a Poisson process of
    `request_rate` per second (exponential gaps; the first at 0), or all at 0 when the rate is infinite."""
    if math.isinf(request_rate):
        return np.zeros(n)
    gaps = np.random.default_rng([seed, 2, point]).exponential(1.0 / request_rate, size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])
