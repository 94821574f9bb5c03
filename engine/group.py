"""One rank of a worker group: the process's place in a torch.distributed group, its share of the model, and the
lockstep that keeps the ranks' collectives paired (docs/DESIGN.md §9).

Each rank is a whole engine of its own (data-parallel attention: its own requests, slots, pages and prefix
cache; the dense weights replicated) holding E/W of every MoE layer's routed experts (model/expert_parallel.py).
A forward on one rank is a forward on all: each MoE layer exchanges tokens with every rank. So the ranks step in
lockstep: every `step` is one tick in which each rank takes part in exactly one forward, its own batch's or,
when it has nothing to run, an empty one (`idle_forward`: its experts still serve the others). A tick where no
rank has tokens runs nothing beyond the token-count exchange.

A failure inside a tick (a collective that fails because another rank died, or a step that raises: the ranks
would no longer pair up) is fatal: the process exits (EXIT_GROUP_BROKEN) and its launcher takes the rest of the
group down (deploy/group.py), so the supervisor can start it again.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from sparsepd.engine.config import EngineConfig
from sparsepd.engine.request import StepOutput
from sparsepd.group_args import GroupSpec, group_spec_from_args
from sparsepd.kernels.device import Backend
from sparsepd.model.expert_parallel import ExpertLayout, ExpertParallel, attach, idle_forward
from sparsepd.model.transformer import Transformer

log = logging.getLogger("sparsepd.group")

EXIT_GROUP_BROKEN = 70  # a rank that cannot go on in step with its group


class RankGroup:
    """This process's rank: joins the group at construction (blocks until every rank has joined, at most
    spec.timeout_s)."""

    def __init__(self, spec: GroupSpec):
        if spec.local_rank is None:
            raise ValueError("a rank's group spec needs its local rank (set by the launcher)")
        self.spec = spec
        if spec.backend == "nccl":
            torch.cuda.set_device(torch.device(spec.device))
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        dist.init_process_group(spec.backend, init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
                                rank=spec.rank, world_size=spec.ep, timeout=timeout)
        # the token counts and the lockstep's flags travel on the host: a gloo group beside NCCL's
        self.host_group = (dist.new_group(backend="gloo", timeout=timeout) if spec.backend == "nccl"
                           else dist.group.WORLD)
        self.model: Transformer | None = None
        self.ep: ExpertParallel | None = None
        self.stopping = False  # set when the worker stops: a peer gone then is a normal end, not a broken group
        threading.Thread(target=self._watch_parent, args=(os.getppid(),), daemon=True).start()
        log.info("rank %d of %d on %s joined (%s)", spec.rank, spec.ep, spec.device, spec.backend)

    @property
    def rank(self) -> int:
        return self.spec.rank

    def _watch_parent(self, parent: int) -> None:
        """Exit when the launcher that started this rank is gone (no orphan outlives its group)."""
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("rank %d: its launcher (pid %d) is gone; exiting", self.rank, parent)
        os._exit(EXIT_GROUP_BROKEN)

    def engine_config(self, cfg: EngineConfig) -> EngineConfig:
        """The worker's engine config for this rank: its device; CUDA graphs only for a group of one (a forward of
        several ranks exchanges token counts on the host: model/expert_parallel.py)."""
        return cfg.model_copy(update=dict(device=self.spec.device, cuda_graph=cfg.cuda_graph and self.spec.ep == 1))

    def build_model(self, cfg: EngineConfig, exchange: Backend = "auto") -> Transformer:
        """This rank's model: the replicated weights and its share of the routed experts (only those read from a
        checkpoint; `--load-format dummy` makes only those). `exchange`: the backend of the experts' row exchange
        (kernels/ep_rows.py; "reference" runs its torch ops on a GPU too)."""
        layout = ExpertLayout(self.spec.rank, self.spec.ep, cfg.resolve_model_config().n_routed_experts)
        self.ep = ExpertParallel(layout, dist.group.WORLD, self.host_group, backend=exchange)
        self.model = attach(cfg.build_model(experts=layout.held), self.ep)
        return self.model

    @property
    def busy(self) -> bool:
        """Whether some rank had tokens in the last tick (the others should tick again soon)."""
        return self.ep is not None and any(self.ep.tokens)

    def step(self, engine, lock=None) -> list[StepOutput]:
        """One lockstep tick: the engine's step when it has work (its forward is this rank's part), else, or when
        the step ran no forward, an empty forward. Fatal on any failure (module docstring). lock: the caller's,
        held over the tick (`Engine.step`)."""
        try:
            before = self.ep.forwards
            outputs = engine.step(lock) if engine.scheduler.has_work else []
            if self.ep.forwards == before:  # no forward of its own (or a replayed graph, which has W = 1)
                idle_forward(self.model)
            return outputs
        except Exception:  # noqa: BLE001 - the ranks no longer pair up: take the group down
            if self.stopping:  # the group is stopping: a peer that left first ends this one too
                os._exit(0)
            log.exception("rank %d: a step failed; the group cannot go on in step", self.rank)
            logging.shutdown()
            os._exit(EXIT_GROUP_BROKEN)

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (a host collective every rank must call)."""
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def close(self, timeout_s: float = 20.0) -> bool:
        """Leave the group: wait for this rank's GPU work, then tear the group down, waiting at most `timeout_s`
        (NCCL's teardown after graph-captured collectives can block forever). Whether the teardown finished."""
        if not dist.is_initialized():
            return True
        if self.spec.backend == "nccl":
            torch.cuda.synchronize()
        done = threading.Event()

        def destroy() -> None:
            dist.destroy_process_group()
            done.set()

        threading.Thread(target=destroy, daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("rank %d: the group's teardown did not finish in %.0f s; leaving without it", self.rank,
                        timeout_s)
            return False
        return True

    def exit(self, code: int = 0) -> None:
        """End a process whose work is done and written: leave the group, flush, and exit without running the
        interpreter's exit-time destructors (NCCL communicators' among them, which can hang after a teardown
        that did not finish). Should leaving itself block, the threads' stacks go to stderr after 60 s and the
        process exits then."""
        faulthandler.dump_traceback_later(60, exit=True)
        t0 = time.monotonic()
        self.close()
        log.info("rank %d left its group in %.1f s", self.rank, time.monotonic() - t0)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def join_group(args) -> RankGroup | None:
    """This process's rank when the worker flags make it one (sparsepd/group_args.py), else None."""
    spec = group_spec_from_args(args)
    if spec is None:
        return None
    if spec.local_rank is None:
        raise ValueError("--devices starts a group through the worker command (deploy/group.py), not here")
    return RankGroup(spec)
