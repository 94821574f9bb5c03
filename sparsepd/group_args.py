"""The flags of a worker that is a group of ranks (several devices, one process each: docs/DESIGN.md §9), and
the group's shape as one frozen model. Torch-free, like engine/args.py: the parsers build without the engine.

`--devices cuda:0,cuda:1 --ep 2`: this host's ranks on these devices, the routed experts split over 2 ranks in
all. Several hosts (as torchrun): every host runs the same command with its own `--node-rank`, the same
`--nnodes`, `--master-addr` and `--master-port`; `--ep` = nnodes × devices per host.
"""

from __future__ import annotations

import argparse

from pydantic import BaseModel, ConfigDict, Field, model_validator


def add_group_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker group: several devices, data-parallel attention and expert parallelism")
    g.add_argument("--devices", default=None,
                   help="comma-separated devices of this host's ranks, one process each, e.g. cuda:0,cuda:1 or "
                        "cpu,cpu (instead of --device); each rank serves its own requests")
    g.add_argument("--ep", type=int, default=1,
                   help="ranks in the group on all hosts together (nnodes × devices); the routed experts are split "
                        "over them (default: 1)")
    g.add_argument("--nnodes", type=int, default=1, help="hosts of the group (default: 1)")
    g.add_argument("--node-rank", type=int, default=0, help="this host's index in the group (default: 0)")
    g.add_argument("--master-addr", default="127.0.0.1",
                   help="the address of node 0, where the group meets (default: %(default)s)")
    g.add_argument("--master-port", type=int, default=0,
                   help="the port where the group meets on node 0; 0 = any free port (one host only)")
    g.add_argument("--group-timeout", type=float, default=300.0,
                   help="seconds a rank waits for the others at start and in a collective before it fails "
                        "(default: %(default)s)")
    g.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher


class GroupSpec(BaseModel):
    """A group's shape as this host sees it, and (in a rank's process) which rank this is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: tuple[str, ...]
    ep: int = Field(ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(0, ge=0, le=65535)
    timeout_s: float = Field(300.0, gt=0)
    local_rank: int | None = None

    @model_validator(mode="after")
    def _check(self) -> GroupSpec:
        if not self.devices:
            raise ValueError("--devices names no device")
        if self.ep != self.nnodes * len(self.devices):
            raise ValueError(f"--ep {self.ep} must equal --nnodes {self.nnodes} × the {len(self.devices)} devices of "
                             f"--devices {','.join(self.devices)}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be < --nnodes {self.nnodes}")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("a group on several hosts needs --master-port (and --master-addr): where node 0 listens")
        if len({d.split(":")[0] for d in self.devices}) > 1:
            raise ValueError(f"--devices {','.join(self.devices)} mixes device kinds")
        if self.local_rank is not None and not 0 <= self.local_rank < len(self.devices):
            raise ValueError(f"local rank {self.local_rank} is outside --devices {','.join(self.devices)}")
        return self

    @property
    def rank(self) -> int:
        return self.node_rank * len(self.devices) + (self.local_rank or 0)

    @property
    def device(self) -> str:
        return self.devices[self.local_rank or 0]

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"


def group_spec_from_args(args: argparse.Namespace) -> GroupSpec | None:
    """The group the flags ask for; None for a plain one-process worker (no --devices, --ep 1)."""
    if args.devices is None:
        if args.ep != 1 or args.nnodes != 1:
            raise ValueError(f"--ep {args.ep} / --nnodes {args.nnodes} need --devices: the devices of this host's "
                             "ranks")
        return None
    return GroupSpec(devices=tuple(d.strip() for d in args.devices.split(",") if d.strip()), ep=args.ep,
                     nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                     master_port=args.master_port, timeout_s=args.group_timeout, local_rank=args.local_rank)
