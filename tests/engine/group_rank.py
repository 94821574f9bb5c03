"""One rank of the group tests (tests/engine/test_group.py runs it as a process per rank): the expert-parallel
model's logits and the engine's greedy tokens on this rank's requests, beside the single-process reference's
(the whole model, every expert), saved for the test to compare.

Requests per rank (mixed batches; the last rank of a group of ≥ 2 has none and runs empty steps throughout):
rank 0 three prompts, one of them chunked beside the others' decodes; rank 1 one prompt that finishes early.
"""

from __future__ import annotations

import argparse
import random

import torch

from sparsepd.engine.config import EngineConfig
from sparsepd.engine.engine import Engine
from sparsepd.engine.group import RankGroup
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.group_args import GroupSpec
from sparsepd.model.expert_parallel import idle_forward

POOLS = PoolConfig(num_slots=6, max_batch_tokens=24, num_pages=48, prefix_cache_entries=0)


def prompts_for(rank: int, world: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_new_tokens) of this rank's requests."""
    if world > 1 and rank == world - 1:
        return []
    rng = random.Random(1000 + rank)
    shapes = [(21, 7), (5, 9), (13, 4)] if rank == 0 else [(9, 3)]
    return [([rng.randrange(1, 256) for _ in range(n)], m) for n, m in shapes]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cuda", action="store_true", help="rank r on cuda:r over NCCL (the engine with CUDA graphs)")
    p.add_argument("--exchange", default="auto", help="the row exchange's backend (kernels/ep_rows.py): auto, "
                   "reference, or triton (the Triton kernels, in the interpreter on the CPU)")
    args = p.parse_args()
    torch.manual_seed(0)
    devices = tuple(f"cuda:{r}" for r in range(args.world)) if args.cuda else ("cpu",) * args.world
    spec = GroupSpec(devices=devices, ep=args.world, master_port=args.port, local_rank=args.rank, timeout_s=600)
    group = RankGroup(spec)
    cfg = group.engine_config(EngineConfig(preset="tiny", seed=3, pools=POOLS))
    model, reference = group.build_model(cfg, exchange=args.exchange), cfg.build_model()
    requests = prompts_for(args.rank, args.world)

    # logits: one request's prefill then three decode steps per rank (a rank without requests runs empty ones)
    logits, ref_logits = [], []
    if requests:
        ids = torch.tensor(requests[0][0], device=spec.device)
        state, ref_state = model.new_state(), reference.new_state()
        logits.append(model.forward(ids, state))
        ref_logits.append(reference.forward(ids, ref_state))
        for _ in range(3):
            token = int(ref_logits[-1][-1].argmax())
            logits.append(model.decode(token, state)[None])
            ref_logits.append(reference.decode(token, ref_state)[None])
    else:
        for _ in range(4):
            idle_forward(model)

    # greedy tokens through the engine, ranks in lockstep
    engine = Engine(model, POOLS, cuda_graph=cfg.cuda_graph, overlap=args.cuda)
    submitted = [engine.submit(ids, SamplingParams(max_new_tokens=m, ignore_eos=True)) for ids, m in requests]
    ticks = 0
    while group.any(engine.scheduler.has_work):
        group.step(engine)
        ticks += 1
    expected = Engine(reference, POOLS).generate([ids for ids, _ in requests],
                                                 [SamplingParams(max_new_tokens=m, ignore_eos=True)
                                                  for _, m in requests]) if requests else []
    logits, ref_logits = [t.cpu() for t in logits], [t.cpu() for t in ref_logits]
    torch.save({"logits": logits, "ref_logits": ref_logits, "tokens": [r.output_ids for r in submitted],
                "ref_tokens": [r.output_ids for r in expected], "ticks": ticks,
                "idle": engine.is_idle_and_empty(), "forwards": group.ep.forwards,
                "held": [n for n, _ in model.named_parameters() if ".ffn.experts." in n]}, args.out)
    group.exit(0)


if __name__ == "__main__":
    main()
