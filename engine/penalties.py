"""Each slot's token history on the device, for the frequency, presence and repetition penalties.

`counts [num_slots, V] int32` (occurrences of each id among the slot's generated tokens) and
`prompt_mask [num_slots, V] bool` (the prompt's ids), allocated on the first request that needs them
(num_slots · V · 5 bytes: 165 MB at 256 slots and V = 129,280). The runner calls `bind` with each
forward's requests (a request seen in its slot for the first time gets its rows rebuilt from its prompt
and output ids: a new request, or one whose state was just imported) and `record` with each step's
sampled tokens on the device, so a step launched before the host has read the previous one's tokens
(the scheduler's overlap) sees them counted. A batch whose requests use no penalty costs nothing here.
`penalty_tensors` builds `sample_batch`'s penalty inputs for a step's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsepd.engine.sampling import Sampler, SamplingParams
from sparsepd.kernels.sampling import PenaltyTensors


class SlotHistory:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str):
        self.num_slots, self.vocab_size, self.device = num_slots, vocab_size, torch.device(device)
        self.counts: torch.Tensor | None = None  # [num_slots, V] int32, allocated on first use
        self.prompt_mask: torch.Tensor | None = None  # [num_slots, V] bool
        self.owner: list[Sampler | None] = [None] * num_slots  # whose history each slot's rows hold
        self.active: set[int] = set()  # slots whose sampled tokens are counted

    def bind(self, requests: Sequence) -> None:
        """Before a forward: give every request that uses a penalty its slot's rows (rebuilt when the slot
        held another request); stop counting for slots now run by requests without one."""
        if not self.active and not any([r.uses_history for r in requests]):  # the common step: no penalty
            return
        for r in requests:
            if not r.uses_history:
                if r.slot in self.active:
                    self.active.discard(r.slot)
                    self.owner[r.slot] = None
                continue
            if self.owner[r.slot] is not r.sampler:
                prompt = r.sampler.prompt_id_set if r.sampler.prompt_id_set is not None else r.prompt_ids
                self._rebuild(r.slot, prompt if r.params.repetition_penalty != 1.0 else (), r.output_ids)
                self.owner[r.slot] = r.sampler
                self.active.add(r.slot)
            r.sampler.history = (self, r.slot)

    def record(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Count each slot's newly sampled token (device `[len(slots)]` int64) where the slot is counted."""
        if not self.active:
            return
        rows = [i for i, s in enumerate(slots) if s in self.active]
        if not rows:
            return
        index = _to_device([rows, [slots[i] for i in rows]], self.device)  # [2, n]
        ones = torch.ones(len(rows), dtype=torch.int32, device=self.device)
        self.counts.index_put_((index[1], tokens[index[0]]), ones, accumulate=True)

    def _rebuild(self, slot: int, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        if self.counts is None:
            shape = (self.num_slots, self.vocab_size)
            with torch.inference_mode(False):  # updated in place by record(), which may run outside it
                self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
                self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.counts[slot].zero_()
        self.prompt_mask[slot].zero_()
        if output_ids:
            ids = _to_device(list(output_ids), self.device)
            self.counts[slot].index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        if prompt_ids:
            self.prompt_mask[slot].index_fill_(0, _to_device(sorted(set(prompt_ids)), self.device), True)


def penalty_tensors(rows: Sequence[tuple[SamplingParams, Sampler, int, int]], device: torch.device) -> PenaltyTensors:
    """`sample_batch`'s penalty inputs for rows of (params, sampler, n_generated, eos id); each row that uses a
    penalty must have been bound (`SlotHistory.bind`); the others read slot 0's rows with no effect."""
    B = len(rows)
    width = max([1, *(len(p.logit_bias) for p, *_ in rows)])
    floats = torch.tensor([[p.frequency_penalty, p.presence_penalty, p.repetition_penalty,
                            *(b for _, b in p.logit_bias), *[0.0] * (width - len(p.logit_bias))]
                           for p, *_ in rows], dtype=torch.float32).reshape(B, 3 + width)
    tables = {id(s.history[0]): s.history[0] for p, s, *_ in rows if p.uses_history}
    if len(tables) > 1:
        raise ValueError("rows of one batch are bound to different slot histories")
    if tables and any(p.uses_history and s.history is None for p, s, *_ in rows):
        raise ValueError("a row with a penalty has no slot history bound (SlotHistory.bind)")
    slots = [s.history[1] if p.uses_history else 0 for p, s, *_ in rows]
    ints = torch.tensor([[*(i for i, _ in p.logit_bias), *[-1] * (width - len(p.logit_bias)), slot]
                         for (p, *_), slot in zip(rows, slots, strict=True)], dtype=torch.int64).reshape(B, width + 1)
    if device.type == "cuda":
        floats = floats.pin_memory().to(device, non_blocking=True)
        ints = ints.pin_memory().to(device, non_blocking=True)
    pen = PenaltyTensors(frequency=floats[:, 0], presence=floats[:, 1], repetition=floats[:, 2],
                         bias_ids=ints[:, :width], bias_values=floats[:, 3:])
    if tables:
        table = next(iter(tables.values()))
        pen.counts = table.counts.index_select(0, ints[:, width])  # [B, V]
        pen.prompt_mask = table.prompt_mask.index_select(0, ints[:, width])
    return pen


def encode_prompt_ids(prompt_ids: Sequence[int], vocab_size: int) -> bytes:
    """The prompt's distinct ids as a little-endian bitmap of ⌈V/8⌉ bytes (bit i of byte i // 8: id i)."""
    bits = bytearray((vocab_size + 7) // 8)
    for t in set(prompt_ids):
        bits[t >> 3] |= 1 << (t & 7)
    return bytes(bits)


def decode_prompt_ids(data: bytes, vocab_size: int) -> tuple[int, ...]:
    """`encode_prompt_ids` undone; raise ValueError if the length or a set bit does not fit the vocabulary."""
    if len(data) != (vocab_size + 7) // 8:
        raise ValueError(f"prompt id bitmap: expected {(vocab_size + 7) // 8} bytes for a vocabulary of "
                         f"{vocab_size}, got {len(data)}")
    ids = tuple(8 * i + j for i, byte in enumerate(data) if byte for j in range(8) if byte >> j & 1)
    if ids and ids[-1] >= vocab_size:
        raise ValueError(f"prompt id bitmap: id {ids[-1]} is outside the vocabulary [0, {vocab_size})")
    return ids


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """Small host ints to the device without a sync (from pinned memory on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
