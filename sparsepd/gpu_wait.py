"""How an engine's loop waits for a step's tokens on a CUDA device (`--gpu-wait`): the choices and their help, in the
floor so that every command's parser (the generate client's too) builds without importing the engine.
engine/draw.py `host_event` turns the choice into a CUDA event."""

from __future__ import annotations

from typing import Literal, get_args

GpuWait = Literal["spin", "block"]
GPU_WAITS: tuple[str, ...] = get_args(GpuWait)
GPU_WAIT_HELP = ("how the engine's loop waits for each step's sampled tokens on a CUDA device: spin (CUDA's default "
                 "event: the waiting thread polls, about one core busy whatever the token rate) or block (a "
                 "blocking-sync event: the thread sleeps until the copy is done; less CPU, a wake-up latency to "
                 "measure against TPOT); no effect on the CPU, which has no CUDA events")
