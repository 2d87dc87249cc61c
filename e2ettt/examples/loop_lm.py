"""A language model that is not the baseline GPT, for `--model-fn e2ettt.examples.loop_lm:build`.

LoopLM: a prelude block, one core block applied `loops` times (weights
shared across the loops, as in recurrent-depth records), a coda block that
also receives the prelude's output through a learned U-Net-style skip, and
an output head tied to the embedding through an `nn.Linear` that shares its
weight. Its layers are named `wq`, `wkv` (fused keys and values), `up` and
`down`: nothing in e2ettt knows them. `build(path)` is the `module:function`
contract: a checkpoint path in, an `nn.Module` mapping ids (B, T) to logits
(B, T, V) out. The checkpoint is a plain dict {"config": {...},
"state_dict": {...}} read with `torch.load(weights_only=True)`.

    python -m e2ettt.examples.loop_lm --out loop_lm.pt     # pretrain one on the demo's train split
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LoopConfig:
    vocab_size: int = 1024
    dim: int = 128
    heads: int = 4
    loops: int = 2  # times the core block runs

    def validate(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)  # keys and values in one matrix
        self.wo = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(B, T, self.heads, -1).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.wkv(h).view(B, T, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.wo(y)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class LoopLM(nn.Module):
    def __init__(self, cfg: LoopConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(1024, cfg.dim)  # learned positions: a table the forward looks up
        nn.init.zeros_(self.pos.weight)
        self.prelude, self.core, self.coda = (Block(cfg.dim, cfg.heads) for _ in range(3))
        self.skip = nn.Parameter(torch.ones(cfg.dim))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied: one weight, two uses
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))  # (B, T, d)
        first = x = self.prelude(x)
        for _ in range(self.cfg.loops):
            x = self.core(x)
        x = self.coda(x + self.skip * first)
        return self.head(self.norm(x)).float()  # (B, T, V)


def build(checkpoint: str) -> LoopLM:
    """The `--model-fn` entry: a LoopLM with the checkpoint's config and weights."""
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = LoopLM(LoopConfig(**obj["config"]))
    model.load_state_dict(obj["state_dict"])
    return model


def save(model: LoopLM, path: str) -> None:
    torch.save({"config": asdict(model.cfg), "state_dict": model.state_dict()}, path)


def pretrain(tokens: Tensor, cfg: LoopConfig, steps: int = 200, seq_len: int = 128, batch: int = 16,
             lr: float = 3e-3, seed: int = 0) -> LoopLM:
    """A few minutes of AdamW on random windows of a token stream (warmup, then cosine)."""
    torch.manual_seed(seed)
    model = LoopLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=g)
        window = tokens[starts[:, None] + torch.arange(seq_len + 1)]
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:>4}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    from e2ettt import data
    from e2ettt.demo import build_demo, default_cache_dir

    p = argparse.ArgumentParser(description="pretrain a LoopLM on the embedded demo's train split")
    p.add_argument("--out", default="loop_lm.pt", help="checkpoint to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="AdamW steps (default: %(default)s)")
    args = p.parse_args(argv)
    demo = build_demo(cache_dir=default_cache_dir())
    tokens = torch.as_tensor(data.load_tokens(demo.data_dir, "train"))
    save(pretrain(tokens, LoopConfig(vocab_size=demo.model.vocab_size), steps=args.steps), args.out)
    print(f"wrote {args.out}; run it with --model-fn e2ettt.examples.loop_lm:build --checkpoint {args.out} "
          f"--data {demo.data_dir} --tokenizer {demo.tokenizer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
