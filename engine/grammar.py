"""Structured output in the engine: one xgrammar matcher per request with a grammar, the step's token bitmask
built on the host and applied to the logits before the draw, each read-back token accepted by its matcher.

A request's grammar is compiled by the engine's `Grammars` (sparsepd/grammar.py: one vocabulary per worker,
cached by kind and text) when the request is made (`Engine.make_request`; a decode worker's Reserve), and its
`GrammarMatch` lives on the `Request`. Per step (engine/scheduler.py):

1. `token_bitmask` fills `[B, ⌈V/32⌉]` int32 on the host for the rows with a grammar (xgrammar's
   `fill_next_token_bitmask`; the others all ones), in pinned memory on CUDA, and copies it to the device
   once (non-blocking). A batch without a grammar builds nothing.
2. `kernels/sampling.py` sets the disallowed ids' logits to −inf before the draw (log-probabilities stay
   those of the raw logits, as for bans).
3. When the token is read back, `GrammarMatch.accept` advances the matcher. A token the matcher rejects is
   a bug (it was masked): that request alone fails with finish reason "error"; the batch goes on. Once the
   matcher has accepted the stop token it is terminated and the request finishes with "stop".

The rules where a grammar meets the other sampling parameters:
- The grammar's one stop token is the model's EOS id: after a complete match the mask allows only EOS
  (or EOS and whatever extends the match, e.g. after `[a-z]+`), and drawing it ends the request with
  "stop". `ignore_eos` does not change this (the grammar cannot go past its end); `stop_token_ids` still
  stop the request wherever the grammar allows them, as without a grammar.
- `min_new_tokens` bans EOS and the stop ids while too few tokens are out. The grammar wins: the ban
  applies to the ids the grammar allows only while something else is allowed too; when the grammar allows
  nothing but banned ids (it must end now), the ban is dropped for that step and the request ends early.
  No row ever has every logit at −inf from a ban.
- `logit_bias` and the penalties shift logits before the mask; a masked id stays −inf whatever its bias.
- `max_new_tokens` still ends the request ("length"), with an output the grammar has not completed.

On a decode worker the matcher is advanced over the tokens the prefill worker already generated (shipped in
the state: engine/state_io.py replays them on import); nothing about the grammar crosses the wire but the
request's sampling parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class GrammarMatch:
    """One request's position in its compiled grammar (an xgrammar.GrammarMatcher)."""

    def __init__(self, compiled: Any):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advance over `token`; False (the matcher unchanged) when the grammar does not allow it."""
        return bool(self.matcher.accept_token(int(token)))

    def replay(self, tokens: Sequence[int]) -> None:
        """Advance over tokens generated elsewhere; ValueError at the first one the grammar rejects."""
        for i, token in enumerate(tokens):
            if not self.accept(token):
                raise ValueError(f"generated token {i} (id {token}) does not match the request's grammar")

    @property
    def terminated(self) -> bool:
        """The stop token was accepted: nothing may follow."""
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (a CPU int32 tensor)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def token_bitmask(matches: Sequence[GrammarMatch | None], vocab_size: int,
                  device: torch.device | str) -> torch.Tensor | None:
    """The step's `[B, ⌈V/32⌉]` int32 mask on `device` for rows with a grammar (others, and terminated
    matchers whose request is ending, all ones); None when no row has one."""
    if matches.count(None) == len(matches):  # (one call, not a generator resumed per row)
        return None
    device = torch.device(device)
    host = torch.full((len(matches), bitmask_words(vocab_size)), -1, dtype=torch.int32,
                      pin_memory=device.type == "cuda")  # [B, W]
    for row, match in enumerate(matches):
        if match is not None and not match.terminated:
            match.fill(host, row)
    return host.to(device, non_blocking=True) if device.type != "cpu" else host


def allowed_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """The ids one `[⌈V/32⌉]` mask row allows (for the tests and error messages)."""
    from sparsepd.kernels.sampling import unpack_token_bitmask

    return unpack_token_bitmask(bitmask_row.reshape(1, -1).cpu(), vocab_size)[0].nonzero().flatten().tolist()
