"""A flow's stage in the router: one enum, its allowed transitions in one table (docs/DESIGN.md §4).

    QUEUED ──▶ RESERVING ──▶ RESERVED ──▶ PREFILLING ──▶ DECODING ──▶ ENDED
      ▲            │             │  ▲          │             │
      └────────────┴─────────────┴──┼──────────┴─────────────┘   back to the queue: no room, or moved
                                    └── the Prefill call failed   (any stage but ENDED may end)

- QUEUED: in the admission queue (first, after no decode worker had room, or after a move), or a choice of an
  n > 1 request riding with its group's queued head.
- RESERVING: taken into a prefill batch; Reserve calls go out to decode workers.
- RESERVED: holds pages and a slot on `flow.decode`; no Prefill call carries it (not sent yet, or it failed).
- PREFILLING: in a Prefill call: the prefill worker computes it and ships its state to the decode worker
  (the router sees one call for both, so the transfer is no stage of its own). Its first token may be delivered
  in this stage (PrefillStream's pending result, before the state is acknowledged). Decode events that arrive
  now wait in `flow.early`.
- DECODING: the prefill worker's final result came (the state is on the decode worker); the rest of the tokens
  come on the decode worker's token stream.
- ENDED: exactly one outcome; whatever it held was released on leaving the stage it held it in.

What a flow holds follows from its stage: a reservation in RESERVED, PREFILLING and DECODING (`HOLDS_DECODE`),
a prefill in flight in PREFILLING. Leaving such a stage releases it (router/reservations.py), so releasing
twice or never is not possible. `Flow.to` is the one place a stage changes: a change the table does not allow is
refused and logged with the request id (a race shows up there, not as a leaked page).
"""

from __future__ import annotations

import enum


class Stage(enum.Enum):
    QUEUED = "queued"
    RESERVING = "reserving"
    RESERVED = "reserved"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    ENDED = "ended"


TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.QUEUED: frozenset({Stage.RESERVING, Stage.ENDED}),
    Stage.RESERVING: frozenset({Stage.RESERVED, Stage.QUEUED, Stage.ENDED}),
    Stage.RESERVED: frozenset({Stage.PREFILLING, Stage.QUEUED, Stage.ENDED}),
    Stage.PREFILLING: frozenset({Stage.DECODING, Stage.RESERVED, Stage.QUEUED, Stage.ENDED}),
    Stage.DECODING: frozenset({Stage.QUEUED, Stage.ENDED}),
    Stage.ENDED: frozenset(),
}

HOLDS_DECODE = frozenset({Stage.RESERVED, Stage.PREFILLING, Stage.DECODING})


def allowed(old: Stage, new: Stage) -> bool:
    return new in TRANSITIONS[old]
