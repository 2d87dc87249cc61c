"""The model's function pinned, not only its names: parameter-golf's baseline GPT written out here a second time,
from its description, as plain tensor arithmetic on a state dict (per head, per position, no module of
e2ettt's), and e2ettt's `GPT` held to its logits on weights large enough that every part matters.

The architecture: token embedding, RMS-normed; layers in two halves, the first half's outputs added back into
the second half in reverse order, each scaled per channel by `skip_weights`; in each block the input is first
mixed with the embedding output x0 by `resid_mix` (two per-channel vectors), then attention and a relu² MLP, each
on the RMS-normed stream and added with a per-channel scale; attention has grouped KV heads, RMS norm of q and k
per head, rotary positions (first half of each head's dims paired with the second), a per-head gain on q, and
causal softmax at 1/sqrt(head_dim); a final RMS norm, the tied embedding (or `lm_head`) as output layer, and the
logits soft-capped as c·tanh(logits/c). RMS norms use the dtype's machine epsilon, as F.rms_norm does by default.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from e2ettt.model import GPT, GPTConfig

REFERENCE = Path(__file__).resolve().parent.parent / "e2ettt" / "reference"


def rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary positions on one head's (T, hd) rows: dims i and i + hd/2 turned by t / base^(2i/hd) at position t."""
    T, hd = x.shape
    half = hd // 2
    out = torch.empty_like(x)
    for i in range(half):
        theta = torch.arange(T, dtype=x.dtype) / base ** (2 * i / hd)
        a, b = x[:, i], x[:, i + half]
        out[:, i] = a * torch.cos(theta) + b * torch.sin(theta)
        out[:, i + half] = b * torch.cos(theta) - a * torch.sin(theta)
    return out


def attention(sd: dict, p: str, x: torch.Tensor, heads: int, kv_heads: int, base: float) -> torch.Tensor:
    T, d = x.shape
    hd = d // heads
    q, k, v = x @ sd[p + "c_q.weight"].T, x @ sd[p + "c_k.weight"].T, x @ sd[p + "c_v.weight"].T
    out = torch.zeros(T, d, dtype=x.dtype)
    for h in range(heads):
        g = h // (heads // kv_heads)  # consecutive query heads share a KV head
        qh = rotate(rms(q[:, h * hd:(h + 1) * hd]), base) * sd[p + "q_gain"][h]
        kh = rotate(rms(k[:, g * hd:(g + 1) * hd]), base)
        vh = v[:, g * hd:(g + 1) * hd]
        for t in range(T):
            scores = (kh[: t + 1] @ qh[t]) / math.sqrt(hd)  # position t sees 0..t
            weights = torch.exp(scores - scores.max())
            out[t, h * hd:(h + 1) * hd] = (weights / weights.sum()) @ vh[: t + 1]
    return out @ sd[p + "proj.weight"].T


def block(sd: dict, i: int, x: torch.Tensor, x0: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    p = f"blocks.{i}."
    mix = sd[p + "resid_mix"]
    x = mix[0] * x + mix[1] * x0
    x = x + sd[p + "attn_scale"] * attention(sd, p + "attn.", rms(x), cfg.num_heads, cfg.num_kv_heads, cfg.rope_base)
    hidden = torch.clamp(rms(x) @ sd[p + "mlp.fc.weight"].T, min=0) ** 2
    return x + sd[p + "mlp_scale"] * (hidden @ sd[p + "mlp.proj.weight"].T)


def plain_logits(sd: dict, cfg: GPTConfig, ids: list[int]) -> torch.Tensor:
    """(T, V) logits of one sequence."""
    x = rms(sd["tok_emb.weight"][ids])
    x0, skips = x, []
    half = cfg.num_layers // 2
    for i in range(half):
        x = block(sd, i, x, x0, cfg)
        skips.append(x)
    for j in range(cfg.num_layers - half):
        if j < len(sd["skip_weights"]):
            x = x + sd["skip_weights"][j] * skips[half - 1 - j]
        x = block(sd, half + j, x, x0, cfg)
    head = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    logits = rms(x) @ head.T
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


def roughened(model: GPT, seed: int) -> GPT:
    """Every parameter drawn away from its initial value: output projections nonzero, gains and mixes far from 1
    and 0, skips and scales of both signs, embeddings large enough that the soft cap bends most logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "tok_emb.weight" or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 3.0)
            elif p.ndim == 2 and "resid_mix" not in name and name != "skip_weights":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:  # gains, scales, mixes, skips
                p.copy_(torch.randn(p.shape, generator=g) * 0.7 + 0.5)
    return model


def reference_config() -> GPTConfig:
    return GPTConfig(**json.loads((REFERENCE / "reference.json").read_text())["model"])


@pytest.mark.parametrize("cfg", [
    GPTConfig(vocab_size=96, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2),  # odd depth
    GPTConfig(vocab_size=96, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=4, mlp_mult=3, tie_embeddings=False,
              logit_softcap=15.0, rope_base=500.0),
    reference_config(),  # the shipped demo's shape
], ids=["tied-gqa-odd", "untied-mha", "demo"])
def test_gpt_computes_parameter_golfs_function_on_weights_where_every_part_matters(cfg):
    model = roughened(GPT(cfg), seed=cfg.num_layers).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    want = plain_logits(sd, cfg, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double()
    assert (want.abs() > 0.5 * cfg.logit_softcap).float().mean() > 0.2  # the cap bends a good share of the logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_the_shipped_reference_model_computes_the_same_function_in_float32():
    cfg = reference_config()
    model = GPT(cfg)
    model.load_state_dict(torch.load(REFERENCE / "final_model.pt", weights_only=True, map_location="cpu"))
    ids = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    want = plain_logits({k: v.double() for k, v in model.state_dict().items()}, cfg, ids)
    with torch.no_grad():
        got = model.eval()(torch.tensor([ids]))[0].double()
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


# --- the shipped examples, each written out a second time from its own docstring -----------------------------------


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One head's causal softmax attention at 1/sqrt(head_dim), one position at a time: (T, hd) rows in and out."""
    out = torch.zeros_like(q)
    for t in range(q.shape[0]):
        scores = (k[: t + 1] @ q[t]) / math.sqrt(q.shape[1])
        weights = torch.exp(scores - scores.max())
        out[t] = (weights / weights.sum()) @ v[: t + 1]
    return out


def rotate_first(x: torch.Tensor, dims: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary positions on the first `dims` of one head's (T, hd) rows; the remaining dims pass unchanged."""
    return torch.cat((rotate(x[:, :dims], base), x[:, dims:]), dim=1)


def record_logits(sd: dict, cfg, ids: list[int]) -> torch.Tensor:
    """RecordGPT as its docstring describes it: banked matrices (queries then output projections in `qo_bank`, keys
    then values in `kv_bank`), weightless RMS norms scaled by 1/sqrt(layer + 1), partial RoPE on `rope_dims`, q_gain,
    LeakyReLU(0.5)² MLP, layers loop_start..loop_end run twice, the order cut in half into encoder and decoder, each
    decoder step taking the last unused encoder output through lerp(skip_weight · skip, x, sigmoid(gate)), tied head
    and soft cap."""
    L, hd = cfg.num_layers, cfg.model_dim // cfg.num_heads
    loop = list(range(cfg.loop_start, cfg.loop_end + 1))
    order = list(range(cfg.loop_start)) + loop + loop + list(range(cfg.loop_end + 1, L))
    encoder, decoder = order[: len(order) // 2], order[len(order) // 2:]

    def layer(i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        p = f"blocks.{i}."
        x = sd[p + "resid_mix"][0] * x + sd[p + "resid_mix"][1] * x0
        h = rms(x) / math.sqrt(i + 1)
        q, k, v = h @ sd["qo_bank"][i].T, h @ sd["kv_bank"][i].T, h @ sd["kv_bank"][L + i].T
        y = torch.zeros_like(x)
        for head in range(cfg.num_heads):
            g = head // (cfg.num_heads // cfg.num_kv_heads)
            qh = rotate_first(rms(q[:, head * hd:(head + 1) * hd]), cfg.rope_dims) * sd[p + "q_gain"][head]
            kh = rotate_first(rms(k[:, g * hd:(g + 1) * hd]), cfg.rope_dims)
            y[:, head * hd:(head + 1) * hd] = causal(qh, kh, v[:, g * hd:(g + 1) * hd])
        x = x + sd[p + "attn_scale"] * (y @ sd["qo_bank"][L + i].T)
        up = rms(x) / math.sqrt(i + 1) @ sd["mlp_up_bank"][i].T
        up = torch.where(up > 0, up, 0.5 * up) ** 2
        return x + sd[p + "mlp_scale"] * (up @ sd["mlp_down_bank"][i].T)

    x = x0 = rms(sd["tok_emb.weight"][ids])
    skips = []
    for i in encoder:
        x = layer(i, x, x0)
        skips.append(x)
    for j, i in enumerate(decoder):
        if j < len(sd["skip_weights"]):
            gate = torch.sigmoid(sd["skip_gates"][j])
            start = sd["skip_weights"][j] * skips.pop()
            x = start + gate * (x - start)
        x = layer(i, x, x0)
    logits = rms(x) @ sd["tok_emb.weight"].T
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5) * weight + bias


def loop_logits(sd: dict, cfg, ids: list[int]) -> torch.Tensor:
    """LoopLM as its docstring describes it: embedding plus learned positions, a prelude block, the core block
    `loops` times with the same weights, a coda block on x + skip · (prelude output), a final LayerNorm and the
    head tied to the embedding. Blocks are pre-LayerNorm: multi-head causal attention with keys then values fused
    in `wkv`, then a GELU MLP with biases."""
    hd = cfg.dim // cfg.heads

    def block(p: str, x: torch.Tensor) -> torch.Tensor:
        h = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q, kv = h @ sd[p + "wq.weight"].T, h @ sd[p + "wkv.weight"].T
        k, v = kv[:, : cfg.dim], kv[:, cfg.dim:]
        y = torch.cat([causal(q[:, s:s + hd], k[:, s:s + hd], v[:, s:s + hd]) for s in range(0, cfg.dim, hd)], dim=1)
        x = x + y @ sd[p + "wo.weight"].T
        z = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"]) @ sd[p + "up.weight"].T + sd[p + "up.bias"]
        gelu = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        return x + gelu @ sd[p + "down.weight"].T + sd[p + "down.bias"]

    x = sd["embed.weight"][ids] + sd["pos.weight"][: len(ids)]
    first = x = block("prelude.", x)
    for _ in range(cfg.loops):
        x = block("core.", x)
    x = block("coda.", x + sd["skip"] * first)
    return layer_norm(x, sd["norm.weight"], sd["norm.bias"]) @ sd["embed.weight"].T


def drawn(model: torch.nn.Module, seed: int, embed: str) -> torch.nn.Module:
    """Every parameter drawn at random: matrices at 1/sqrt(fan-in) (banks per slice), the embedding large, every
    vector (gains, scales, mixes, skips, gates, norm weights and biases) of both signs and far from its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == embed:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0)
            elif p.ndim >= 2 and "resid_mix" not in name and "skip" not in name and name != "pos.weight":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.7 + 0.5)
    return model


def test_the_record_example_computes_the_function_its_docstring_describes():
    from e2ettt.examples.record_lm import RecordConfig, RecordGPT

    cfg = RecordConfig(vocab_size=96, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3,
                       rope_dims=4, loop_start=1, loop_end=2)
    model = drawn(RecordGPT(cfg), seed=3, embed="tok_emb.weight").double().eval()
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    want = record_logits({k: v.detach() for k, v in model.state_dict().items()}, cfg, ids)
    with torch.no_grad():
        got = model.forward_logits(torch.tensor([ids]))[0].double()
    assert (want.abs() > 0.5 * cfg.logit_softcap).float().mean() > 0.2
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_the_loop_example_computes_the_function_its_docstring_describes():
    from e2ettt.examples.loop_lm import LoopConfig, LoopLM

    cfg = LoopConfig(vocab_size=96, dim=32, heads=4, loops=3)
    model = drawn(LoopLM(cfg), seed=5, embed="embed.weight").double().eval()
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(6)).tolist()
    want = loop_logits({k: v.detach() for k, v in model.state_dict().items()}, cfg, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double()
    assert want.std() > 1.0  # logits spread widely: every part of the stream contributes
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
