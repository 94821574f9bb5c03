"""Train sparsepd's default model: a small DeepSeek-V4 (every layer kind, a hash-routed layer, routed experts, one
MTP layer trained jointly) on the Python standard library's own source, byte by byte, on the CPU.

    python tools/train_default_model.py                      # the shipped model (about 25 minutes, one thread)
    python tools/train_default_model.py --size test --steps 5 --out /tmp/m   # a quick check

Data: every `*.py` file of this interpreter's standard library (`sysconfig.get_paths()["stdlib"]`, test suites
and site-packages left out), in sorted order; a file whose path's CRC32 is divisible by `--heldout-every` is
held out. A training sequence is `--seq-len` + 1 bytes at a uniformly random offset of the training files
joined by newlines (one generator seeded by `--seed`); tokens are bytes (the `tiny` tokenizer: id i < 256 is
byte i), with no special tokens, as a served prompt has none.

The forward is the model's own (model/transformer.py's blocks, model/request_cache.py's attention over one
sequence, model/mtp.py), with gradients, in fp32: the trained weights mean the same thing to the serving
engine. Loss: cross-entropy of the next byte plus `--mtp-weight` × that of the byte after it (the MTP layer,
as DeepSeek-V3/V4 train it). AdamW, linear warm-up then cosine decay to a tenth, gradients clipped at 1.
The routed experts are balanced without an auxiliary loss (DeepSeek's bias update: each step every gate's
bias moves by `--bias-step` towards the experts that got less than their share). The indexers get no
gradient through their top-k (DeepSeek trains them with a separate objective) and keep their initial weights;
the shipped model's `index_topk` covers every compressed entry of a training sequence.

Output (`--out`): the published checkpoint layout — `config.json` (DeepSeek-V4 keys, read back and checked),
`model.safetensors` (fp32, with `mtp.0.*`), the byte-level `tokenizer.json` / `tokenizer_config.json`, the
held-out sample the tests score (`heldout_sample.txt`, `--sample-pieces` pieces of `--seq-len` bytes) and
`training.json` (the settings, the loss curve, the held-out bits per byte and the time taken).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sparsepd.checkpoint_config import read_checkpoint_config
from sparsepd.engine.generate import generate
from sparsepd.engine.sampling import SamplingParams
from sparsepd.load_options import resolve_model_config
from sparsepd.model.mtp import MTP_PREFIX, MTPBlock, load_mtp
from sparsepd.model.request_cache import RequestCache
from sparsepd.model.state import RequestState
from sparsepd.model.transformer import Transformer
from sparsepd.model.weights import build_model, init_random
from sparsepd.model_config import ModelConfig
from sparsepd.router.model_card import MODELS_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_checkpoint import quantize_checkpoint  # noqa: E402  (tools/ is a folder of scripts)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sparsepd" / "models" / "v4-byte-demo"
SAMPLE_FILE = "heldout_sample.txt"
CALIBRATION_STEPS = 10
LOG2E = 1 / math.log(2)

# The shapes: every V4 layer kind (SWA, CSA, HCA), a hash-routed first layer, routed and shared experts.
SIZES: dict[str, dict] = {
    "demo": dict(dim=128, n_layers=4, compress_ratios=(0, 4, 16, 4), n_hash_layers=1, n_heads=4, head_dim=96,
                 rope_dim=32, q_lora_rank=64, o_groups=2, o_lora_rank=64, window=64, index_n_heads=4,
                 index_topk=64, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=96),
    "test": dict(dim=32, n_layers=3, compress_ratios=(0, 4, 16), n_hash_layers=1, n_heads=2, head_dim=96,
                 rope_dim=32, q_lora_rank=16, o_groups=2, o_lora_rank=16, window=8, index_n_heads=1,
                 index_topk=4, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32),
}
# Shared by both sizes: the tiny preset's byte vocabulary and specials, its context and YaRN settings.
COMMON = dict(vocab_size=260, bos_id=256, eos_id=257, max_seq_len=1024, rope_factor=4.0, original_seq_len=256,
              route_scale=1.5, dtype="float32", page_size=128)
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


def model_config(size: str, name: str) -> ModelConfig:
    return ModelConfig(name=name, **COMMON, **SIZES[size])


def published_config(cfg: ModelConfig) -> dict:
    """config.json in the published DeepSeek-V4 keys (model/checkpoint_config.py reads it back to `cfg`)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_hash_layers": cfg.n_hash_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_dim, "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank, "sliding_window": cfg.window,
        "compress_ratios": [*cfg.compress_ratios, 0],  # the MTP layer's: sliding window only
        "rope_theta": cfg.rope_theta, "compress_rope_theta": cfg.compress_rope_theta,
        "rope_scaling": {"type": "yarn", "factor": cfg.rope_factor,
                         "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                         "beta_slow": cfg.beta_slow},
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "n_shared_experts": cfg.n_shared_experts, "moe_intermediate_size": cfg.moe_inter_dim,
        "routed_scaling_factor": cfg.route_scale, "swiglu_limit": cfg.swiglu_limit, "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True, "topk_method": "noaux_tc", "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": cfg.dtype,
    }


# --- data ----------------------------------------------------------------------------------------
def stdlib_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts))


def split_corpus(root: Path, heldout_every: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(training bytes, held-out bytes) as uint8 tensors, and what went where."""
    train, held, names = [], [], []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        (held if zlib.crc32(rel.encode()) % heldout_every == 0 else train).append(path.read_bytes())
        if zlib.crc32(rel.encode()) % heldout_every == 0:
            names.append(rel)
    info = {"root": str(root), "python": platform.python_version(), "train_files": len(train),
            "train_bytes": sum(map(len, train)), "heldout_files": names, "heldout_bytes": sum(map(len, held))}
    return _as_tensor(b"\n".join(train)), _as_tensor(b"\n".join(held)), info


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def fixed_windows(data: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` windows of `length` bytes evenly spaced over `data` (the same every run)."""
    stride = (data.numel() - length) // max(count, 1)
    return [data[i * stride: i * stride + length].long() for i in range(count)]


# --- the forward with gradients ---------------------------------------------------------------------
def sequence_losses(model: Transformer, mtp: MTPBlock, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (nats) of the next byte and, through the MTP layer, of the byte after it, over one
    sequence `window` `[T+1]`: the model's blocks and attention state exactly as a prefill runs them."""
    cfg = model.cfg
    inputs = window[:-1]
    positions = torch.arange(inputs.numel())
    h = model.embed(inputs)[:, None, :].repeat(1, cfg.hc_mult, 1)  # [T, hc, dim]
    cache = RequestCache(RequestState.fresh(cfg))
    for layer_id, layer in enumerate(model.layers):
        h = layer(h, positions, inputs, cache, layer_id)
    main = F.cross_entropy(model.logits(h), window[1:])
    following = inputs[1:]  # row i: the stream at i and the embedding of token i+1 predict token i+2
    mtp_cache = RequestCache(RequestState.fresh(mtp.cfg))
    y = mtp(h[:-1], model.embed(following), following, positions[:-1], mtp_cache)
    return main, F.cross_entropy(mtp.logits(y, model.head.weight), window[2:])


def evaluate(model: Transformer, mtp: MTPBlock, windows: list[torch.Tensor]) -> tuple[float, float]:
    """Bits per byte of the next byte and of the MTP layer's byte after it over `windows`."""
    with torch.no_grad():
        losses = [sequence_losses(model, mtp, w) for w in windows]
    return (sum(m.item() for m, _ in losses) / len(losses) * LOG2E,
            sum(x.item() for _, x in losses) / len(losses) * LOG2E)


class GateBalance:
    """Auxiliary-loss-free balancing: counts each score-routed gate's choices during a step, then moves its bias
    by `step` up for the experts below their share and down for those above."""

    def __init__(self, gates: list[torch.nn.Module], step: float):
        self.step = step
        self.counts = {id(g): torch.zeros(g.bias.numel()) for g in gates}
        self.gates = gates
        for gate in gates:
            gate.register_forward_hook(self._count)

    def _count(self, gate, _inputs, output) -> None:
        self.counts[id(gate)] += torch.bincount(output[1].flatten(), minlength=gate.bias.numel()).float()

    def update(self) -> None:
        with torch.no_grad():
            for gate in self.gates:
                counts = self.counts[id(gate)]
                gate.bias += self.step * torch.sign(counts.mean() - counts)
                counts.zero_()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_trainable(cfg: ModelConfig, seed: int, init: Path | None = None) -> tuple[Transformer, MTPBlock]:
    """The model and its MTP layer, every float parameter but the gates' balancing biases trainable: from the
    project's random init (model/init_rules.py; biases at zero), or from the checkpoint `init` (a second stage)."""
    if init is not None:
        model, mtp = build_model(cfg, checkpoint=init), load_mtp(cfg, init)  # named after --out
    else:
        model = init_random(Transformer(cfg), seed)
        mtp = MTPBlock(cfg)
        init_random(mtp, seed + 1)  # the same rules by name: e_proj/h_proj as projections, norms at 1
    for module in (model, mtp):
        for name, p in module.named_parameters():
            p.requires_grad_(p.dtype.is_floating_point and not name.endswith("gate.bias"))
            if name.endswith("gate.bias") and init is None:
                p.data.zero_()
    return model.train(), mtp.train()


def train(args: argparse.Namespace, cfg: ModelConfig, train_data: torch.Tensor,
          eval_windows: list[torch.Tensor]) -> tuple[Transformer, MTPBlock, dict]:
    torch.manual_seed(args.seed)
    model, mtp = build_trainable(cfg, args.seed, args.init)
    params = [p for m in (model, mtp) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gates = [m.ffn.gate for m in [*model.layers, mtp] if m.ffn.gate.bias is not None]
    balance = GateBalance(gates, args.bias_step)
    rng = random.Random(args.seed)
    curve, start, recent = [], time.perf_counter(), []
    n_params = sum(p.numel() for p in params)
    print(f"{cfg.name}: {n_params / 1e6:.2f}M trained parameters ({n_params - _mtp_count(mtp):,} model, "
          f"{_mtp_count(mtp):,} MTP); {args.steps} steps of {args.batch}×{args.seq_len} bytes", flush=True)
    steps = args.steps
    for step in range(args.steps):
        lr = learning_rate(step, steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        main_sum = mtp_sum = 0.0
        for _ in range(args.batch):
            offset = rng.randrange(train_data.numel() - args.seq_len - 1)
            main, extra = sequence_losses(model, mtp, train_data[offset: offset + args.seq_len + 1].long())
            ((main + args.mtp_weight * extra) / args.batch).backward()
            main_sum, mtp_sum = main_sum + main.item(), mtp_sum + extra.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        balance.update()
        recent.append((main_sum / args.batch * LOG2E, mtp_sum / args.batch * LOG2E))
        last = step + 1 == steps
        if (step + 1) % args.eval_every == 0 or last or step == 0:
            held, held_mtp = evaluate(model, mtp, eval_windows)
            train_bits = sum(r[0] for r in recent) / len(recent)
            train_mtp = sum(r[1] for r in recent) / len(recent)
            elapsed = time.perf_counter() - start
            curve.append({"step": step + 1, "train_bits_per_byte": round(train_bits, 4),
                          "train_mtp_bits_per_byte": round(train_mtp, 4), "heldout_bits_per_byte": round(held, 4),
                          "heldout_mtp_bits_per_byte": round(held_mtp, 4), "lr": lr, "elapsed_s": round(elapsed, 1)})
            print(f"step {step + 1:5d}/{steps}  train {train_bits:.3f} bits/byte (mtp {train_mtp:.3f})  "
                  f"held-out {held:.3f} (mtp {held_mtp:.3f})  lr {lr:.2e}  {elapsed:7.1f} s", flush=True)
            recent = []
        if args.minutes and step + 1 == CALIBRATION_STEPS:
            steps = fit_steps(args, time.perf_counter() - start, step + 1)
        if step + 1 >= steps:
            break
    return model, mtp, {"curve": curve, "train_s": round(time.perf_counter() - start, 1), "steps_run": step + 1,
                        "trained_parameters": n_params, "mtp_parameters": _mtp_count(mtp)}


def fit_steps(args: argparse.Namespace, elapsed_s: float, done: int) -> int:
    """With --minutes: the number of steps that fits the budget at the pace of the first steps (the machine may
    be shared), fixed from here on so the schedule anneals fully; rerun with --steps N to repeat a run."""
    steps = max(done, min(args.steps, int(args.minutes * 60 / (elapsed_s / done))))
    print(f"--minutes {args.minutes:g}: {elapsed_s / done:.2f} s a step, so {steps} steps", flush=True)
    args.steps = steps
    return steps


def _mtp_count(mtp: MTPBlock) -> int:
    return sum(p.numel() for p in mtp.parameters() if p.requires_grad)


# --- the checkpoint ---------------------------------------------------------------------------------
def write_checkpoint(out: Path, model: Transformer, mtp: MTPBlock, sample: list[torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors |= {MTP_PREFIX + k: v.detach().clone().contiguous() for k, v in mtp.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(published_config(model.cfg), indent=1) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tiny preset's byte-level tokenizer
        shutil.copyfile(MODELS_DIR / "tiny" / name, out / name)
    (out / SAMPLE_FILE).write_bytes(bytes(torch.cat(sample).to(torch.uint8).tolist()))
    read_back = read_checkpoint_config(out)
    if read_back != model.cfg:
        raise RuntimeError(f"{out}/config.json reads back as {read_back}, expected {model.cfg}")


def sample_bits_per_byte(directory: Path, piece_len: int, sample: Path | None = None) -> tuple[float, float]:
    """Bits per byte of the held-out sample (default: the directory's own) through the serving path: the
    checkpoint loaded by the published-layout loader as `serve` loads it (a quantized one kept quantized), each
    piece prefilled in inference mode; the MTP layer's from load_mtp (stored plain in either case)."""
    cfg = resolve_model_config(None, str(directory))
    model = build_model(cfg, checkpoint=directory)
    mtp = load_mtp(cfg.model_copy(update={"weight_format": "plain"}), directory)
    data = (sample or directory / SAMPLE_FILE).read_bytes()
    main = extra = 0.0
    pieces = [torch.tensor(list(data[i: i + piece_len])) for i in range(0, len(data), piece_len)]
    with torch.inference_mode():
        for ids in pieces:
            logits, hidden = model.forward(ids, model.new_state(), return_hidden=True)
            main += F.cross_entropy(logits[:-1], ids[1:]).item()
            following = ids[1:-1]
            y = mtp(hidden[-1][:-2], model.embed(following), following, torch.arange(following.numel()),
                    RequestCache(RequestState.fresh(mtp.cfg)))
            extra += F.cross_entropy(mtp.logits(y, model.head.weight), ids[2:]).item()
    return main / len(pieces) * LOG2E, extra / len(pieces) * LOG2E


def greedy_sample(directory: Path, prompt: str, max_new_tokens: int) -> str:
    cfg = read_checkpoint_config(directory)
    model = build_model(cfg, checkpoint=directory)
    params = SamplingParams.checked(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    out = generate(model, list(prompt.encode()), params)
    return bytes(i for i in out.output_ids if i < 256).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: the shipped one)")
    p.add_argument("--size", choices=sorted(SIZES), default="demo", help="model shape (default: %(default)s)")
    p.add_argument("--steps", type=int, default=420)
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="bytes a sequence predicts (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps (default: %(default)s)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (default: %(default)s)")
    p.add_argument("--bias-step", type=float, default=0.005, help="gate bias update (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-every", type=int, default=20, help="hold out files with crc32(path) %% N == 0")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out sequences scored at each evaluation")
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--sample-pieces", type=int, default=16, help="pieces of --seq-len bytes in the shipped sample")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"fit the run to this budget: after {CALIBRATION_STEPS} steps, cut --steps to what fits at "
                        "their pace (training.json records the steps run)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint (written by this script) instead of random weights: a further "
                        "stage of training; its training.json is kept in the new one as `earlier`")
    p.add_argument("--quantized-copy", type=Path, default=None,
                   help="also write an FP8/FP4 copy of the trained checkpoint here (tools/quantize_checkpoint.py) and "
                        "report its held-out bits per byte beside the full-precision one")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="the text's root")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 8:
        p.error("--steps and --batch must be ≥ 1 and --seq-len ≥ 8")
    torch.set_num_threads(args.threads)
    cfg = model_config(args.size, args.out.resolve().name)
    train_data, heldout, data_info = split_corpus(args.stdlib, args.heldout_every)
    print(f"data: {data_info['train_files']} files, {data_info['train_bytes']:,} bytes to train on; "
          f"{len(data_info['heldout_files'])} files, {data_info['heldout_bytes']:,} bytes held out "
          f"(Python {data_info['python']} standard library)", flush=True)
    half = heldout.numel() // 2  # training evaluations score the first half, the shipped sample the second
    eval_windows = fixed_windows(heldout[:half], args.eval_windows, args.seq_len + 1)
    sample = fixed_windows(heldout[half:], args.sample_pieces, args.seq_len)
    earlier_text = (args.init / "training.json").read_text() if args.init and (args.init / "training.json").is_file() \
        else None
    model, mtp, figures = train(args, cfg, train_data, eval_windows)
    write_checkpoint(args.out, model, mtp, sample)
    bits, mtp_bits = sample_bits_per_byte(args.out, args.seq_len)
    text = greedy_sample(args.out, "def fibonacci(", 120)
    print(f"held-out sample ({args.sample_pieces}×{args.seq_len} bytes) through the loader: {bits:.3f} bits/byte, "
          f"MTP {mtp_bits:.3f}", flush=True)
    print(f"greedy 'def fibonacci(': {text!r}", flush=True)
    quantized = None
    if args.quantized_copy is not None:
        quantize_checkpoint(args.out, args.quantized_copy)
        q_bits, q_mtp_bits = sample_bits_per_byte(args.quantized_copy, args.seq_len, args.out / SAMPLE_FILE)
        quantized = {"directory": str(args.quantized_copy), "sample_bits_per_byte": round(q_bits, 4),
                     "sample_mtp_bits_per_byte": round(q_mtp_bits, 4)}
        print(f"FP8/FP4 copy in {args.quantized_copy}: {q_bits:.3f} bits/byte, MTP {q_mtp_bits:.3f}", flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    earlier = json.loads(earlier_text) if earlier_text else None
    report = {"settings": settings, "earlier": earlier, "data": data_info, **figures,
              "sample_bits_per_byte": round(bits, 4), "sample_mtp_bits_per_byte": round(mtp_bits, 4),
              "greedy_def_fibonacci": text, "quantized_copy": quantized, "torch": torch.__version__}
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {figures['train_s']:.0f} s of training", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
