"""A rank of an expert-parallel group loads only its tensors (model/weights.py with `experts`): from a
checkpoint it reads the replicated weights and its own routed experts and no byte of the others' (counted at
the safetensors reads), the values equal the whole model's; random and dummy weights of a rank equal the whole
model's for every tensor it holds."""

from __future__ import annotations

import pytest
import torch

from sparsepd.model import weights as weights_module
from sparsepd.model.expert_parallel import ExpertLayout
from sparsepd.model.weights import build_model, save_checkpoint
from sparsepd.model_config import get_preset


class CountingOpen:
    """safe_open that adds the bytes of every tensor read to `counter`."""

    def __init__(self, real, counter: list[int], names: list[str]):
        self.real, self.counter, self.names = real, counter, names

    def __call__(self, *args, **kwargs):
        counter, names, handle = self.counter, self.names, self.real(*args, **kwargs)

        class Shard:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                t = self.inner.get_tensor(name)
                counter[0] += t.nbytes
                names.append(name)
                return t

            def __getattr__(self, attr):
                return getattr(self.inner, attr)

        return Shard()


def _expert_bytes(model: torch.nn.Module) -> dict[int, int]:
    by_expert: dict[int, int] = {}
    for name, p in model.state_dict().items():
        if ".ffn.experts." in name:
            e = int(name.split(".")[4])
            by_expert[e] = by_expert.get(e, 0) + p.nbytes
    return by_expert


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_tensors(world, tmp_path, monkeypatch):
    cfg = get_preset("tiny")
    full = build_model(cfg, seed=5)
    save_checkpoint(full, tmp_path)
    total = sum(t.nbytes for t in full.state_dict().values())
    experts = _expert_bytes(full)
    real = weights_module.safe_open
    for rank in range(world):
        held = ExpertLayout(rank, world, cfg.n_routed_experts).held
        counter, names = [0], []
        monkeypatch.setattr(weights_module, "safe_open", CountingOpen(real, counter, names))
        model = build_model(cfg, checkpoint=tmp_path, experts=held)
        monkeypatch.setattr(weights_module, "safe_open", real)
        others = sum(b for e, b in experts.items() if e not in held)
        assert counter[0] == total - others, f"rank {rank} read {counter[0]} bytes, expected {total - others}"
        assert not [n for n in names if ".ffn.experts." in n and int(n.split(".")[4]) not in held]
        state, reference = model.state_dict(), full.state_dict()
        assert set(state) == {n for n in reference if ".ffn.experts." not in n or int(n.split(".")[4]) in held}
        for name, value in state.items():
            assert torch.equal(value, reference[name]), name


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_random_weights_of_a_rank_equal_the_whole_model(load_format):
    cfg = get_preset("tiny")
    full = build_model(cfg, seed=9, load_format=load_format).state_dict()
    for rank in range(2):
        held = ExpertLayout(rank, 2, cfg.n_routed_experts).held
        part = build_model(cfg, seed=9, load_format=load_format, experts=held).state_dict()
        assert len(part) < len(full)
        for name, value in part.items():
            assert torch.equal(value, full[name]), name


def test_layout_rejects_an_uneven_split():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        ExpertLayout(0, 3, 8)


def test_fp4_experts_of_a_rank_dummy_and_from_a_checkpoint(tmp_path, monkeypatch):
    """FP4 experts kept packed (stacks of the held experts only): dummy weights and a checkpoint's bytes of a rank
    equal the whole model's, and the rank reads none of the others' expert bytes."""
    cfg = get_preset("tiny", moe_inter_dim=64, weight_format="fp8_fp4", compress_ratios=(0, 4, 128, 4, 0),
                     page_size=128)
    full = build_model(cfg, seed=2, load_format="dummy")
    save_checkpoint(full, tmp_path)
    want = {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v for k, v in full.state_dict().items()}
    real = weights_module.safe_open
    for rank in range(2):
        held = ExpertLayout(rank, 2, cfg.n_routed_experts).held
        for model in (build_model(cfg, seed=2, load_format="dummy", experts=held), None):
            if model is None:
                names: list[str] = []
                monkeypatch.setattr(weights_module, "safe_open", CountingOpen(real, [0], names))
                model = build_model(cfg, checkpoint=tmp_path, experts=held)
                monkeypatch.setattr(weights_module, "safe_open", real)
                assert not [n for n in names if ".ffn.experts." in n and int(n.split(".")[4]) not in held]
            got = model.state_dict()
            assert {int(n.split(".")[4]) for n in got if ".ffn.experts." in n} == set(held)
            assert model.layers[0].ffn.experts.stacks[0].shape[0] == len(held)
            for name, value in got.items():
                v = value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value
                assert torch.equal(v, want[name]), name
