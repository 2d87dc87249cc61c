"""The parameter-golf baseline GPT, whole, read top to bottom.

Same `state_dict` names and shapes as parameter-golf's `train_gpt.py`
(seed/REFERENCE_MODEL.md): GQA attention with RoPE (half-split form) and
QK RMS-norm with per-head q_gain, relu² MLP, tied embeddings, logit
softcap, per-channel resid_mix and attn/mlp scales, U-Net skip weights.
`GPT(ids)` maps token ids (B, T) to float32 logits (B, T, V).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        t = torch.arange(T, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)  # (T, hd/2)
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary = Rotary(self.head_dim, rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, g, T, hd)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0][None, None] * x + mix[1][None, None] * x0
        x = x + self.attn_scale.to(x.dtype)[None, None] * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype)[None, None] * self.mlp(rms_norm(x))


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 1024  # SentencePiece vocabulary (sp1024 in the reference runs)
    num_layers: int = 9  # half encoder, half decoder with U-Net skips
    model_dim: int = 512  # residual width
    num_heads: int = 8  # query heads; head_dim = model_dim / num_heads
    num_kv_heads: int = 4  # grouped KV heads (GQA)
    mlp_mult: int = 2  # MLP hidden = mlp_mult * model_dim
    tie_embeddings: bool = True  # lm head reuses tok_emb
    logit_softcap: float = 30.0  # logits = c * tanh(logits / c)
    rope_base: float = 10000.0  # RoPE base frequency
    qk_gain_init: float = 1.5  # initial per-head q_gain
    tied_embed_init_std: float = 0.005  # tok_emb init when tied

    def validate(self) -> None:
        if self.model_dim % self.num_heads:
            raise ValueError(f"model.model_dim={self.model_dim} is not divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError("model head_dim must be even for RoPE")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.blocks = nn.ModuleList(
            Block(cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult, cfg.rope_base, cfg.qk_gain_init)
            for _ in range(cfg.num_layers)
        )
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        for block in self.blocks:  # output projections start at zero, as in parameter-golf
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def forward(self, ids: Tensor) -> Tensor:
        x = rms_norm(self.tok_emb(ids))  # (B, T, d)
        x0 = x
        skips = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0)
            skips.append(x)
        for j in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[j].to(x.dtype)[None, None] * skips.pop()
            x = self.blocks[self.num_encoder_layers + j](x, x0)
        x = rms_norm(x)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight.to(x.dtype)).float()  # (B, T, V)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
