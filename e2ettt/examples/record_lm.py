"""A record-style model and its own artifact, as the parameter-golf records of the #1493 / #1851 lineage ship them.

What a record holder brings, written here from those records' published facts (no code of theirs):

- the model class: matrices held in *banks*, one `nn.Parameter` per kind
  (`qo_bank` (2L, d, d): queries then output projections, `kv_bank`
  (2L, kv, d), `mlp_up_bank` (L, h, d), `mlp_down_bank` (L, d, h)), each
  slice applied with `F.linear`; weightless RMS norms with a 1/√(layer+1)
  scale, q_gain, partial RoPE, LeakyReLU(0.5)² MLP, depth recurrence
  (layers `loop_start..loop_end` run twice), sigmoid-gated U-Net skips,
  tied embeddings and a logit softcap. `forward(ids, targets)` returns the
  loss (as the records' training loop wants); `forward_logits(ids)` the
  logits. Attention is FlashAttention 3 when it is installed and the
  tensors are bf16/fp16 on a GPU, else PyTorch's SDPA;
- `final_model.pt`: `torch.save(model.state_dict())`, banked names;
- `final_model.int6.ptz`: the matrices *unbanked* to per-layer names
  (`blocks.i.attn.c_q.weight`, ...), each stored as int6 codes with fp16
  per-row scales (clip at k·std of the row, "SDClip": k = 12.85 for
  matrices, 20 for the int8 embedding), small tensors as fp16
  passthrough, `torch.save({"w": ..., "m": ...})`, byte-shuffled,
  Brotli quality 11 (lzma and zlib too, for tests).

e2ettt reads that artifact with its built-in int6 per-row reader;
`load_artifact` (the `--artifact-fn`) adds the one thing a banked model
needs, putting the per-layer matrices back into banks. `build` is the
`--model-fn`; run with `--model-output method:forward_logits`.

    python -m e2ettt.examples.record_lm --out record     # pretrain one on the demo's data; write both files
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import lzma
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # FlashAttention 3 (Hopper GPUs); absent on CPU machines
    from flash_attn_interface import flash_attn_func as _fa3
except ImportError:
    _fa3 = None

CONTROL = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "skip_gates")


@dataclass(frozen=True)
class RecordConfig:
    vocab_size: int = 1024
    num_layers: int = 4
    model_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_mult: int = 4
    rope_dims: int = 16  # RoPE on the first 16 of each head's dims (partial RoPE)
    qk_gain_init: float = 5.25
    logit_softcap: float = 30.0
    loop_start: int = 1  # layers loop_start..loop_end run twice (depth recurrence)
    loop_end: int = 2

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def layer_order(self) -> list[int]:
        loop = list(range(self.loop_start, self.loop_end + 1))
        return list(range(self.loop_start)) + loop + loop + list(range(self.loop_end + 1, self.num_layers))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotate_half_split(x: Tensor, cos: Tensor, sin: Tensor, dims: int) -> Tensor:
    """RoPE in the half-split form on the first `dims` of the last dimension; the rest passes."""
    rot, rest = x[..., :dims], x[..., dims:]
    a, b = rot[..., : dims // 2], rot[..., dims // 2 :]
    return torch.cat((a * cos + b * sin, a * (-sin) + b * cos, rest), dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention over (B, T, heads, head_dim) with grouped KV heads: FA3 where it runs, else SDPA."""
    if _fa3 is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = _fa3(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class Block(nn.Module):
    """Per-layer control tensors; the matrices come from the model's banks."""

    def __init__(self, cfg: RecordConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.cfg = cfg
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.ln_scale = 1.0 / math.sqrt(layer + 1)

    def forward(self, x: Tensor, x0: Tensor, w: tuple[Tensor, ...], rope: tuple[Tensor, Tensor]) -> Tensor:
        q_w, k_w, v_w, o_w, up_w, down_w = w
        cfg = self.cfg
        B, T, d = x.shape
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.ln_scale
        q = F.linear(h, q_w.to(h.dtype)).view(B, T, cfg.num_heads, cfg.head_dim)  # (B, T, h, hd)
        k = F.linear(h, k_w.to(h.dtype)).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = F.linear(h, v_w.to(h.dtype)).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = (t.to(q.dtype) for t in rope)
        q = rotate_half_split(rms_norm(q), cos, sin, cfg.rope_dims) * self.q_gain.to(q.dtype)[:, None]
        k = rotate_half_split(rms_norm(k), cos, sin, cfg.rope_dims)
        y = attention(q, k, v).reshape(B, T, d)
        x = x + self.attn_scale.to(x.dtype) * F.linear(y, o_w.to(y.dtype))
        h = rms_norm(x) * self.ln_scale
        up = F.leaky_relu(F.linear(h, up_w.to(h.dtype)), negative_slope=0.5).square()
        return x + self.mlp_scale.to(x.dtype) * F.linear(up, down_w.to(up.dtype))


class RecordGPT(nn.Module):
    def __init__(self, cfg: RecordConfig):
        super().__init__()
        self.cfg = cfg
        L, d, kv, hid = cfg.num_layers, cfg.model_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_mult * cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv, d))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hid, d))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, d, hid))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        order = cfg.layer_order
        self.encoder, self.decoder = order[: len(order) // 2], order[len(order) // 2 :]
        skips = min(len(self.encoder), len(self.decoder))
        self.skip_weights = nn.Parameter(torch.ones(skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(skips, d))
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, cfg.rope_dims, 2, dtype=torch.float32) / cfg.rope_dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        L = self.cfg.num_layers
        for i in range(L):
            nn.init.orthogonal_(self.qo_bank.data[i])
            nn.init.zeros_(self.qo_bank.data[L + i])  # output projections start at zero
            nn.init.orthogonal_(self.kv_bank.data[i])
            nn.init.orthogonal_(self.kv_bank.data[L + i])
            nn.init.orthogonal_(self.mlp_up_bank.data[i])
            nn.init.zeros_(self.mlp_down_bank.data[i])

    def bank_weights(self, i: int) -> tuple[Tensor, ...]:
        L = self.cfg.num_layers
        return (self.qo_bank[i], self.kv_bank[i], self.kv_bank[L + i], self.qo_bank[L + i], self.mlp_up_bank[i],
                self.mlp_down_bank[i])

    def forward_logits(self, ids: Tensor) -> Tensor:
        T = ids.shape[1]
        freqs = torch.outer(torch.arange(T, device=ids.device, dtype=torch.float32), self.inv_freq)[None, :, None, :]
        rope = (freqs.cos(), freqs.sin())
        x = x0 = rms_norm(self.tok_emb(ids))  # (B, T, d)
        skips = []
        for i in self.encoder:
            x = self.blocks[i](x, x0, self.bank_weights(i), rope)
            skips.append(x)
        for j, i in enumerate(self.decoder):
            if j < len(self.skip_weights) and skips:
                gate = torch.sigmoid(self.skip_gates[j].to(x.dtype))
                x = torch.lerp(self.skip_weights[j].to(x.dtype) * skips.pop(), x, gate)
            x = self.blocks[i](x, x0, self.bank_weights(i), rope)
        logits = F.linear(rms_norm(x), self.tok_emb.weight.to(x.dtype)).float()  # tied head
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)  # (B, T, V)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def config_of(state: dict[str, Tensor]) -> RecordConfig:
    """The sizes a banked state dict holds (the rest are this file's constants, as a record's are its defaults)."""
    L, hid, d = state["mlp_up_bank"].shape
    heads = state["blocks.0.q_gain"].numel()
    kv = state["kv_bank"].shape[1]
    return dataclasses.replace(RecordConfig(), vocab_size=state["tok_emb.weight"].shape[0], num_layers=L, model_dim=d,
                               num_heads=heads, num_kv_heads=kv // (d // heads), mlp_mult=hid // d)


def build(checkpoint: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> RecordGPT:
    """The --model-fn: the record model with the checkpoint's weights; in bf16 its banks are bf16, as the records
    evaluate them (control tensors stay fp32)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = RecordGPT(config_of(state))
    model.load_state_dict(state, strict=True)
    model = model.to(device)
    if dtype in (torch.bfloat16, torch.float16):
        for name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
            getattr(model, name).data = getattr(model, name).data.to(dtype)
    return model


# --- the artifact: unbanked, int6 per-row with SDClip, byte-shuffled, compressed -----------------------------------

PER_LAYER = {"qo_bank": ("attn.c_q.weight", "attn.proj.weight"), "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
             "mlp_up_bank": ("mlp.fc.weight",), "mlp_down_bank": ("mlp.proj.weight",)}


def unbank(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Banks as per-layer matrices (blocks.i.attn.c_q.weight, ...), everything else as it is."""
    out = {}
    for name, t in state.items():
        if name in PER_LAYER:
            parts = PER_LAYER[name]
            n = t.shape[0] // len(parts)
            for p, part in enumerate(parts):
                for i in range(n):
                    out[f"blocks.{i}.{part}"] = t[p * n + i]
        else:
            out[name] = t
    return out


def rebank(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """`unbank` undone."""
    out = {k: v for k, v in flat.items() if not any(k.endswith(part) for parts in PER_LAYER.values() for part in parts)}
    layers = 1 + max(int(k.split(".")[1]) for k in flat if k.endswith("mlp.fc.weight"))
    for bank, parts in PER_LAYER.items():
        out[bank] = torch.stack([flat[f"blocks.{i}.{part}"] for part in parts for i in range(layers)])
    return out


def quantize_sdclip(W: Tensor, bits: int, clip_sigmas: float) -> tuple[Tensor, Tensor]:
    """int-`bits` codes in [-(2^(b-1)-1), 2^(b-1)-1] (int8 tensor) and fp16 per-row scales k·std(row)/range."""
    top = 2 ** (bits - 1) - 1
    s = (clip_sigmas * W.float().std(dim=1) / top).clamp_min(1e-10).half()
    q = torch.clamp(torch.round(W.float() / s.float()[:, None]), -top, top).to(torch.int8)
    return q, s


def write_artifact(state: dict[str, Tensor], path: str | Path, bits: int = 6, embed_bits: int = 8,
                   clip_sigmas: float = 12.85, embed_clip_sigmas: float = 20.0, compressor: str = "brotli",
                   min_numel: int = 4096) -> int:
    """Write the record-style artifact of a banked state dict; return its bytes. Matrices above `min_numel` entries
    are quantized (the records pass up to 65,536 through; this demo-size model's matrices are 8K-65K)."""
    from e2ettt.checkpoint import byte_shuffle

    w, meta = {}, {}
    for name, t in unbank(state).items():
        t = t.detach().cpu().contiguous()
        if not t.is_floating_point() or t.numel() <= min_numel or t.ndim != 2:
            w[name] = t.half() if t.is_floating_point() else t
            meta[name] = "passthrough (float16)"
            continue
        embedding = name.startswith("tok_emb")
        b = embed_bits if embedding else bits
        w[name + ".q"], w[name + ".scale"] = quantize_sdclip(t, b, embed_clip_sigmas if embedding else clip_sigmas)
        meta[name] = f"gptq (int{b})"  # the records' label for this per-row format
    buf = io.BytesIO()
    torch.save({"w": w, "m": meta}, buf)
    raw = byte_shuffle(buf.getvalue())
    if compressor == "brotli":
        import brotli

        blob = brotli.compress(raw, quality=11)
    elif compressor == "lzma":
        blob = lzma.compress(raw, preset=6)
    elif compressor == "zlib":
        blob = zlib.compress(raw, 9)
    else:
        raise ValueError(f"compressor must be brotli, lzma or zlib, got {compressor!r}")
    Path(path).write_bytes(blob)
    return len(blob)


def load_artifact(path: str) -> dict[str, Tensor]:
    """The --artifact-fn: e2ettt's built-in reader of the int6 per-row format, then the per-layer matrices banked."""
    from e2ettt.checkpoint import read_weights

    return rebank(read_weights(path).state)


# --- a record of our own, trained on the demo's data ----------------------------------------------------------------

def pretrain(tokens: Tensor, cfg: RecordConfig, steps: int, seq_len: int = 128, batch: int = 16, lr: float = 3e-3,
             seed: int = 0, log=print) -> RecordGPT:
    """AdamW on random windows of a token stream (warmup, then cosine), through forward(ids, targets) -> loss."""
    torch.manual_seed(seed)
    model = RecordGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=g)
        window = tokens[starts[:, None] + torch.arange(seq_len + 1)]
        loss = model(window[:, :-1], window[:, 1:])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"record_lm: step {step + 1}/{steps}, loss {loss.item():.3f}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    from e2ettt import data
    from e2ettt.demo import DemoConfig, build_demo, default_cache_dir

    p = argparse.ArgumentParser(description="pretrain a record-style model on the demo's data and write a record "
                                "folder: final_model.pt, final_model.int6.ptz, tokenizer.model and data/")
    p.add_argument("--out", default="record", help="directory to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps (default: %(default)s)")
    p.add_argument("--documents", type=int, default=0, help="demo documents to build the data from (0: all)")
    args = p.parse_args(argv)
    demo = build_demo(DemoConfig(steps=0, max_documents=args.documents), default_cache_dir())  # data, no demo model
    tokens = torch.as_tensor(data.load_tokens(demo.data_dir, "train"))
    model = pretrain(tokens, RecordConfig(vocab_size=demo.model.vocab_size), steps=args.steps)
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "final_model.pt")
    size = write_artifact(model.state_dict(), out / "final_model.int6.ptz")
    shutil.copy(demo.tokenizer, out / "tokenizer.model")
    for shard in demo.data_dir.glob("*.bin"):
        shutil.copy(shard, out / "data" / shard.name)
    print(f"wrote {out}/: final_model.pt, final_model.int6.ptz ({size:,} bytes), tokenizer.model, data/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
