"""What one `sparsepd loadtest` invocation does: one frozen config, validated at the edge (the CLI)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LengthRange(BaseModel):
    """Token counts drawn uniformly from [low, high] (low == high: a fixed length)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LengthRange:
        if self.high < self.low:
            raise ValueError(f"range {self.low}-{self.high}: the upper end is below the lower end")
        return self

    @classmethod
    def parse(cls, text: str, option: str) -> LengthRange:
        """`256` (fixed) or `2048-8192` (inclusive range)."""
        parts = text.replace(":", "-").split("-")
        if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"{option} {text!r}: expected N or LOW-HIGH (token counts, e.g. 256 or 2048-8192)")
        values = [int(part) for part in parts]
        if min(values) < 1:
            raise ValueError(f"{option} {text!r}: token counts must be ≥ 1")
        if values[-1] < values[0]:
            raise ValueError(f"{option} {text!r}: the upper end is below the lower end")
        return cls(low=values[0], high=values[-1])

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def parse_sweep(text: str) -> tuple[int, ...]:
    """`1,2,4,8` → (1, 2, 4, 8): one point per max concurrency, run in the given order."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--sweep {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise ValueError(f"--sweep {text!r}: expected concurrencies ≥ 1, e.g. 1,2,4,8")
    return values


def parse_ids(text: str, option: str) -> tuple[int, ...]:
    """`1,5,128-259` → (1, 5, 128, 129, …, 259): token ids, singly or as inclusive ranges."""
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ValueError(f"{option} {text!r}: expected token ids and ranges, e.g. 0,2,128-259")
        ids.extend(range(int(low), int(high or low) + 1))
    return tuple(ids)


class MultiTurnConfig(BaseModel):
    """Conversations that each send `turns` requests one after another, every turn's prompt the previous
    prompt, the server's output for it and `user_len` new tokens; all begin with the same `system_len` ids.
    Later turns repeat their conversation's whole history, which a prefix cache can serve."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    conversations: int = Field(64, ge=1)
    turns: int = Field(4, ge=1)
    system_len: int = Field(2048, ge=0)  # the system prompt shared by every conversation (0: none)
    user_len: int = Field(256, ge=1)  # new random tokens appended every turn

    @property
    def requests(self) -> int:
        """Requests sent when no conversation stops early."""
        return self.conversations * self.turns


class LoadTestConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # the target: a running router, or `sparsepd serve SERVE_ARGS` launched on 127.0.0.1 for the run
    router: str = "127.0.0.1:30000"
    launch: bool = False
    serve_args: tuple[str, ...] = ()
    launch_timeout_s: float = Field(900.0, gt=0)

    # the workload
    input_len: LengthRange = LengthRange(low=512, high=512)
    output_len: LengthRange = LengthRange(low=128, high=128)
    dataset: str | None = None  # JSONL of prompts instead of random token ids
    multi_turn: MultiTurnConfig | None = None  # None: independent single-turn prompts
    seed: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0)
    stop_token_ids: tuple[int, ...] = ()  # never drawn: every request sets min_new_tokens = its output length

    # the load: one point per concurrency; None = no limit
    concurrencies: tuple[int | None, ...] = (None,)
    request_rate: float = Field(math.inf, gt=0)  # requests/s, Poisson arrivals; inf = all at once
    num_prompts: int | None = Field(None, ge=1)  # per point; None = max(16, 4 × concurrency)
    max_seconds: float = Field(300.0, gt=0)  # per point: no request starts after this
    drain_seconds: float = Field(30.0, ge=0)  # then in-flight requests get this long before they are cut
    request_timeout_s: float = Field(600.0, gt=0)
    warmup_requests: int = Field(1, ge=0)

    # service-level objectives for goodput
    slo_ttft_ms: float | None = Field(None, gt=0)
    slo_tpot_ms: float | None = Field(None, gt=0)

    # output
    results: str = "loadtest_results.jsonl"
    label: str = ""
    plot_prefix: str | None = None  # draw PNGs after the run (prefix of their paths)
    progress: bool = True

    @model_validator(mode="after")
    def _checked(self) -> LoadTestConfig:
        host, _, port = self.router.rpartition(":")
        if not self.launch and (not host or not port.isdigit()):
            raise ValueError(f"--router {self.router!r}: expected HOST:PORT, e.g. 127.0.0.1:30000")
        if self.serve_args and not self.launch:
            raise ValueError("--serve-args is only used with --launch")
        if self.multi_turn is not None:
            if self.dataset is not None:
                raise ValueError("--dataset is for the single-turn workload; multi-turn prompts are random token ids")
            if self.num_prompts is not None:
                raise ValueError("--num-prompts is for the single-turn workload; multi-turn sends --conversations "
                                 "× --turns requests")
            if len(self.concurrencies) != 1:
                raise ValueError("--sweep is for the single-turn workload: a multi-turn run is one point (a later "
                                 "point would find the earlier points' prompts in the prefix cache); use "
                                 "--max-concurrency")
        return self

    def prompts_for(self, concurrency: int | None) -> int:
        """Requests sent at one point: --num-prompts, else enough to fill the concurrency four times over."""
        if self.multi_turn is not None:
            return self.multi_turn.requests
        if self.num_prompts is not None:
            return self.num_prompts
        return max(16, 4 * concurrency) if concurrency else 64
