"""The DeepSeek-V4 network: embedding, blocks (mHC around attention and MoE), hyper-head, norm, head.

The network is stateless; a request's state (`RequestState`) is an argument that `forward` reads and
advances. `prefill(tokens)` starts a fresh state, `decode(token, state)` adds one token, and any split of a
prompt into chunks fed to `forward` leaves the same state as one prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepd.model.attention import Attention, AttentionCache
from sparsepd.model.compressor import RMSNorm
from sparsepd.model.hyper import hc_head, hc_post, hc_pre
from sparsepd.model.moe import MoE
from sparsepd.model.numerics import linear
from sparsepd.model.request_cache import RequestCache
from sparsepd.model.state import RequestState
from sparsepd.model_config import ModelConfig


def _hc_params(module: nn.Module, prefix: str, hc: int, dim: int, n_scale: int, mix: int) -> None:
    module.register_parameter(f"{prefix}_fn", nn.Parameter(torch.zeros(mix, hc * dim), requires_grad=False))
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.zeros(mix), requires_grad=False))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.ones(n_scale), requires_grad=False))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, experts: range | None = None):
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.cfg = cfg
        self.attn = Attention(cfg, layer_id)
        self.ffn = MoE(cfg, layer_id, experts)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        mix = (2 + cfg.hc_mult) * cfg.hc_mult
        _hc_params(self, "hc_attn", cfg.hc_mult, cfg.dim, 3, mix)
        _hc_params(self, "hc_ffn", cfg.hc_mult, cfg.dim, 3, mix)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor, cache: AttentionCache,
                layer_id: int) -> torch.Tensor:
        cfg = self.cfg
        x, post, comb = hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, cfg.hc_sinkhorn_iters,
                               cfg.hc_eps, cfg.norm_eps)
        h = hc_post(self.attn(self.attn_norm(x), positions, cache, layer_id), h, post, comb)
        x, post, comb = hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, cfg.hc_sinkhorn_iters,
                               cfg.hc_eps, cfg.norm_eps)
        return hc_post(self.ffn(self.ffn_norm(x), token_ids), h, post, comb)


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits `[n, vocab]` = x · weight^T. A bf16 head on the GPU is read once in bf16 and accumulated in
    fp32 (cuBLAS with an fp32 output); on the CPU, or for an fp32 head, the product is computed in fp32."""
    if x.is_cuda and weight.dtype != torch.float32:
        return torch.mm(x.reshape(-1, x.shape[-1]).to(weight.dtype), weight.t(),
                        out_dtype=torch.float32).reshape(*x.shape[:-1], weight.shape[0])
    return linear(x.float(), weight.float())


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: range | None = None):
        """experts: the routed experts this process holds (expert parallel, model/expert_parallel.py; default
        all)."""
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.cfg = cfg
        self.ep = None  # expert parallel: set by model/expert_parallel.py's attach()
        self.embed = Embedding(cfg.vocab_size, cfg.dim, dtype)
        self.layers = nn.ModuleList(Block(cfg, i, experts) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        # The head in the model's dtype, as the checkpoint stores it; logits accumulate and come out in fp32.
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False, dtype=dtype).requires_grad_(False)
        _hc_params(self, "hc_head", cfg.hc_mult, cfg.dim, 1, cfg.hc_mult)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, state: RequestState, return_hidden: bool = False):
        """Logits `[n, vocab]` fp32 for token_ids `[n]` at positions state.position…; advances the state."""
        n, cfg = token_ids.shape[0], self.cfg
        if n == 0:
            raise ValueError("forward needs at least one token")
        if state.position + n > cfg.max_seq_len:
            raise ValueError(f"position {state.position} + {n} tokens exceeds max_seq_len={cfg.max_seq_len}")
        positions = torch.arange(state.position, state.position + n, device=token_ids.device)
        out = self.forward_batch(token_ids, positions, RequestCache(state), return_hidden=return_hidden)
        state.position += n
        return out

    @torch.inference_mode()
    def forward_batch(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: AttentionCache,
                      logit_rows: torch.Tensor | None = None, return_hidden: bool = False, ids_checked: bool = False,
                      final_rows: torch.Tensor | None = None):
        """Logits `[rows, vocab]` fp32 for a flat batch of tokens at `positions` whose keys `cache` keeps;
        only the rows in `logit_rows` (all when None) go through the head. `ids_checked`: the caller has
        checked the ids on the host (the engine does), so the forward skips its own check (a host sync).
        `final_rows`: also return the last block's output `[n, hc, dim]` at these rows, for `logits` later
        (the engine scores prompt positions from them a slice at a time: engine/prompt_logprobs.py)."""
        if return_hidden and final_rows is not None:
            raise ValueError("forward_batch: return_hidden and final_rows cannot be combined")
        cfg = self.cfg
        if not ids_checked and (int(token_ids.min()) < 0 or int(token_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in the vocabulary [0, {cfg.vocab_size}), "
                             f"got min {int(token_ids.min())} max {int(token_ids.max())}")
        if self.ep is not None:  # expert parallel: every rank of the group takes part in each forward
            self.ep.begin_forward(token_ids.shape[0])
        h = self.embed(token_ids)[:, None, :].repeat(1, cfg.hc_mult, 1)  # [n, hc, dim]
        hidden = [] if return_hidden else None
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, positions, token_ids, cache, layer_id)
            if hidden is not None:
                hidden.append(h)
        if final_rows is not None:
            return self.logits(h if logit_rows is None else h[logit_rows]), h[final_rows]
        logits = self.logits(h if logit_rows is None else h[logit_rows])
        return (logits, hidden) if return_hidden else logits

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[n, vocab]` of the last block's output `h` `[n, hc, dim]`: hyper-head, norm, head."""
        cfg = self.cfg
        x = hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, cfg.hc_eps, cfg.norm_eps)
        return head_logits(self.norm(x), self.head.weight)

    def new_state(self) -> RequestState:
        return RequestState.fresh(self.cfg, self.device)

    def prefill(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, RequestState]:
        state = self.new_state()
        return self.forward(token_ids, state), state

    def decode(self, token_id: int, state: RequestState) -> torch.Tensor:
        """Logits `[vocab]` of the next token after token_id."""
        ids = torch.tensor([token_id], dtype=torch.long, device=self.device)
        return self.forward(ids, state)[0]
