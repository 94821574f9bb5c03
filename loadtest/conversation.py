"""What a multi-turn conversation sends. Every conversation begins with the same system prompt of random
token ids; each turn appends `user_len` new random ids:

    turn 1:    system + user_1
    turn k+1:  prompt of turn k + the server's output ids for turn k + user_{k+1}

so every turn repeats its conversation's whole history, and every conversation shares the system prompt:
the prefixes a prefix cache can serve. The user ids and output length of (conversation, turn) come from
their own seeded generator, so the same seed sends the same tokens whatever order the turns run in.
A conversation ends after its last turn, when a turn fails (its output is unknown), or before a turn whose
prompt plus output would not fit the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsepd.loadtest.config import LengthRange, MultiTurnConfig
from sparsepd.loadtest.workload import ModelFacts, allowed_ids

# why a conversation stopped
DONE = "done"  # every turn completed
CONTEXT = "context"  # the next turn would not fit the context
FAILED = "failed"  # a turn failed: the next prompt needs its output
TIME = "time"  # the run's time bound stopped it (its turn was cut, or the next was never sent)
ENDINGS = (DONE, CONTEXT, FAILED, TIME)


@dataclass(slots=True)
class Conversation:
    """One conversation's progress: the turn it sends next (1-based), that turn's prompt and output length,
    how many turns it sent, and, once it has stopped, why (one of ENDINGS)."""

    index: int
    turn: int
    prompt: tuple[int, ...]
    output_len: int
    sent: int = 0
    ended: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class ConversationPlan:
    """The seeded inputs of every conversation, known before any output; `start` and `advance` build the
    prompts."""

    conversations: int
    turns: int
    system_ids: tuple[int, ...]
    user_len: int
    output_len: LengthRange
    allowed: np.ndarray  # [V'] the ids random tokens are drawn from (no eos, bos or pad)
    max_context_length: int
    seed: int

    def user_turn(self, conversation: int, turn: int) -> tuple[tuple[int, ...], int]:
        """(the user ids, the output length) of one turn of one conversation."""
        rng = np.random.default_rng([self.seed, 4, conversation, turn])
        output_len = int(rng.integers(self.output_len.low, self.output_len.high + 1))
        user = self.allowed[rng.integers(0, len(self.allowed), size=self.user_len)]
        return tuple(user.tolist()), output_len

    def start(self, conversation: int) -> Conversation:
        """The conversation before its first turn: system + user_1."""
        user, output_len = self.user_turn(conversation, 1)
        return Conversation(conversation, 1, self.system_ids + user, output_len)

    def advance(self, conversation: Conversation, output_ids: list[int] | tuple[int, ...]) -> None:
        """After the conversation's current turn completed with `output_ids`: set up the next turn, or end it
        (DONE after the last turn; CONTEXT when the next prompt plus its output would exceed the context)."""
        if conversation.turn >= self.turns:
            conversation.ended = DONE
            return
        user, output_len = self.user_turn(conversation.index, conversation.turn + 1)
        prompt = next_prompt(conversation.prompt, output_ids, user)
        if len(prompt) + output_len > self.max_context_length:
            conversation.ended = CONTEXT
            return
        conversation.turn += 1
        conversation.prompt, conversation.output_len = prompt, output_len


def next_prompt(prompt: tuple[int, ...], output_ids: list[int] | tuple[int, ...],
                user_ids: tuple[int, ...]) -> tuple[int, ...]:
    """Turn k+1's prompt: turn k's prompt, then turn k's output, then the new user tokens."""
    return (*prompt, *output_ids, *user_ids)


def make_plan(spec: MultiTurnConfig, output_len: LengthRange, model: ModelFacts, seed: int) -> ConversationPlan:
    """The plan of `spec.conversations` conversations; refuses a first turn that cannot fit the context."""
    first = spec.system_len + spec.user_len + output_len.high
    if first > model.max_context_length:
        raise ValueError(f"--system-len {spec.system_len} + --user-len {spec.user_len} + --output-len {output_len} "
                         f"can reach {first} tokens in the first turn; the model's context length is "
                         f"{model.max_context_length}")
    allowed = allowed_ids(model)
    rng = np.random.default_rng([seed, 3])
    system_ids = tuple(allowed[rng.integers(0, len(allowed), size=spec.system_len)].tolist())
    return ConversationPlan(spec.conversations, spec.turns, system_ids, spec.user_len, output_len, allowed,
                            model.max_context_length, seed)
