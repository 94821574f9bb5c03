"""The multi-token-prediction (MTP) layer of a V4 checkpoint (`mtp.0.*`, `num_nextn_predict_layers` = 1).

One more block after the model's last layer, with its own attention state, that predicts the token after the
next one. For row i it takes the last block's output stream `h_i` `[hc, dim]` (before the hyper-head) and the
embedding of token i+1, the token the model predicted (or was given) after position i:

    x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(h_i))        (broadcast over the hc copies)
    y = Block(x) at RoPE position i;  logits = head(norm(hc_head(y)))   → token i+2

The embedding and the head are the model's own (shared, as DeepSeek's MTP shares them); the block is a full V4
block, sliding-window attention (V4's MTP layer has compress ratio 0) and score-routed experts. Its tensors are
named as in the published checkpoint: `mtp.0.{e_proj,h_proj,enorm,hnorm,norm}.weight`, `mtp.0.hc_head_*`, and
the block's own (`mtp.0.attn.*`, `mtp.0.ffn.*`, `mtp.0.hc_attn_*`, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from sparsepd.model.attention import AttentionCache
from sparsepd.model.compressor import RMSNorm
from sparsepd.model.hyper import hc_head
from sparsepd.model.init_rules import hc_base, init_rule
from sparsepd.model.linear import make_linear
from sparsepd.model.transformer import Block, _hc_params, head_logits
from sparsepd.model_config import ModelConfig

MTP_PREFIX = "mtp.0."


def mtp_layer_config(cfg: ModelConfig) -> ModelConfig:
    """The MTP layer as a one-layer model of `cfg`'s sizes: sliding-window attention, no hash routing. Its
    attention state is a one-layer `RequestState` of this config (layer 0)."""
    return ModelConfig(**{**cfg.model_dump(), "name": f"{cfg.name}-mtp", "n_layers": 1, "compress_ratios": (0,),
                          "n_hash_layers": 0})


class MTPBlock(Block):
    def __init__(self, cfg: ModelConfig):
        layer_cfg = mtp_layer_config(cfg)
        super().__init__(layer_cfg, 0)
        dtype = getattr(torch, cfg.dtype)
        fp8 = cfg.weight_format != "plain"
        self.e_proj = make_linear(cfg.dim, cfg.dim, dtype, fp8)
        self.h_proj = make_linear(cfg.dim, cfg.dim, dtype, fp8)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        _hc_params(self, "hc_head", cfg.hc_mult, cfg.dim, 1, cfg.hc_mult)

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                cache: AttentionCache) -> torch.Tensor:
        """The MTP block's output stream `[n, hc, dim]` from the model's last stream h `[n, hc, dim]`, the
        embeddings `[n, dim]` of the next tokens `next_ids` `[n]` (the routing of the hash-free gate does not
        read them), at `positions` `[n]`; `cache` keeps the layer's keys at its layer 0."""
        x = self.e_proj(self.enorm(embedded))[:, None, :] + self.h_proj(self.hnorm(h))  # [n, hc, dim]
        return super().forward(x, positions, next_ids, cache, 0)

    def logits(self, y: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[n, vocab]` of the token after the next: the MTP layer's own hyper-head and norm, the
        model's head."""
        cfg = self.cfg
        x = hc_head(y, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, cfg.hc_eps, cfg.norm_eps)
        return head_logits(self.norm(x), head_weight)


def load_mtp(cfg: ModelConfig, directory: str | Path) -> MTPBlock:
    """The checkpoint's MTP layer (`mtp.0.*`, stored plain: float32/bfloat16/float16, the hash-free gate's
    bias fp32) in `cfg`'s dtype; every tensor must be there with its shape, and no other `mtp.0.*` tensor."""
    if cfg.weight_format != "plain":
        raise ValueError(f"load_mtp reads plain weights; weight_format={cfg.weight_format!r}")
    block = MTPBlock(cfg)
    params = block.state_dict()
    files = sorted(Path(directory).glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():
                if name.startswith(MTP_PREFIX):
                    found[name.removeprefix(MTP_PREFIX)] = shard.get_tensor(name)
    missing = sorted(set(params) - set(found))
    extra = sorted(set(found) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint {directory}: MTP tensors missing {[MTP_PREFIX + n for n in missing[:5]]}, "
                         f"unexpected {[MTP_PREFIX + n for n in extra[:5]]}")
    with torch.no_grad():
        for name, p in params.items():
            value = found[name]
            if tuple(value.shape) != tuple(p.shape) or value.dtype.is_floating_point != p.dtype.is_floating_point:
                raise ValueError(f"checkpoint {directory}: tensor {MTP_PREFIX + name!r} is {value.dtype} "
                                 f"{tuple(value.shape)}, expected {p.dtype} {tuple(p.shape)}")
            p.copy_(value)
    return block.eval()


def random_mtp(cfg: ModelConfig, seed: int) -> MTPBlock:
    """An MTP layer with random weights from `seed` by the same rules as the model's (model/init_rules.py), for
    presets without a checkpoint: it drafts, but its drafts are seldom accepted."""
    if cfg.weight_format != "plain":
        raise ValueError(f"random_mtp fills plain weights; weight_format={cfg.weight_format!r}")
    block, gen = MTPBlock(cfg), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(block.named_parameters()):
            kind, value = init_rule(block.cfg, name, tuple(p.shape))
            if kind == "normal":
                p.copy_(torch.randn(p.shape, generator=gen) * value)
            elif kind == "const":
                p.fill_(value)
            elif kind == "hc_base":
                p.copy_(hc_base(p.shape[0], cfg.hc_mult))
    return block.eval()
