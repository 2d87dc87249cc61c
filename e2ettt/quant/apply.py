"""The one place that walks a model: quantize it under a regime, report the damage.

`quantize_model(model, regime, cfg, calib)` returns a new float model
holding the dequantized weights (the original is untouched) and a report:
bits, method, quantized parameter count, artifact bytes (zlib and lzma),
per-tensor relative error, GPTQ's layer proxy loss where a Hessian exists,
and wall time. Which tensors: 2-D weights with more than `min_numel`
elements (the tied embedding at `embed_bits`, by RTN); everything else
passes through (parameter-golf's control tensors in fp32, others rounded
to fp16, as they would be stored).

GPTQ runs block by block and, inside a block, group by group
(q/k/v, attn proj, mlp fc, mlp proj), each group's Hessian 2XᵀX/n taken
from calibration inputs that already flow through every quantized layer
before it.
"""
from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from e2ettt.model import GPT, rms_norm
from e2ettt.quant import pg_int8
from e2ettt.quant.artifact import compressed_sizes, pack_codes
from e2ettt.quant.gptq import gptq, proxy_loss
from e2ettt.quant.hadamard import Rotation
from e2ettt.quant.regimes import QuantConfig, Regime
from e2ettt.quant.rtn import Quantized, rtn

EMBED = "tok_emb.weight"
BLOCK_GROUPS = (("attn.c_q", "attn.c_k", "attn.c_v"), ("attn.proj",), ("mlp.fc",), ("mlp.proj",))


@dataclass
class QuantReport:
    regime: str
    method: str
    bits: int
    quantized_params: int = 0
    artifact_bytes_zlib: int = 0
    artifact_bytes_lzma: int = 0
    seconds: float = 0.0
    tensors: list[dict] = field(default_factory=list)  # name, numel, rel_error, proxy_loss, rtn_proxy_loss

    @property
    def artifact_bytes(self) -> int:
        """The headline size: lzma-compressed packed artifact."""
        return self.artifact_bytes_lzma


def is_quantized(name: str, t: Tensor, cfg: QuantConfig) -> bool:
    if t.ndim != 2 or t.numel() <= cfg.min_numel or not t.is_floating_point():
        return False
    return cfg.embed_bits > 0 if name == EMBED else True


def stored_passthrough(name: str, t: Tensor) -> Tensor:
    """A passthrough tensor as parameter-golf stores it (control fp32, other floats fp16)."""
    if not t.is_floating_point() or any(p in name for p in pg_int8.CONTROL_PATTERNS):
        return t
    return t.to(torch.float16)


class _Hessians:
    """Forward-pre-hooks summing XᵀX of each named linear's inputs."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums = {n: torch.zeros(m.weight.shape[1], m.weight.shape[1], dtype=torch.float64, device=m.weight.device)
                     for n, m in modules.items()}
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.sums[name] += x.T @ x
            self.counts[name] += x.shape[0]
        return hook

    def close(self) -> dict[str, Tensor]:
        for h in self.handles:
            h.remove()
        return {n: (2.0 * s / max(1, self.counts[n])).float() for n, s in self.sums.items()}


def _quantize_weight(name: str, W: Tensor, bits: int, regime: Regime, cfg: QuantConfig,
                     H: Tensor | None) -> tuple[Quantized, Tensor, dict]:
    """Quantize one weight; return the codes, the dequantized float weight and its stats."""
    R = Rotation(W.shape[1], cfg.rotation_seed * 1_000_003 + zlib.crc32(name.encode())) if regime.rotate else None
    Wr = R.apply(W.double()).float() if R else W.float()
    Hr = R.conjugate(H.double()).float() if (R and H is not None) else H
    if H is not None and regime.method == "gptq":
        q = gptq(Wr, Hr, bits, cfg.gptq_block, cfg.gptq_damp, cfg.act_order, cfg.clip_q)
    else:
        q = rtn(Wr, bits, cfg.clip_q)
    deq = R.inverse(q.Q.double()).float() if R else q.Q
    stats = {"name": name, "numel": W.numel(), "bits": bits,
             "rel_error": float((deq - W).norm() / W.norm().clamp_min(1e-12))}
    if H is not None:
        stats["proxy_loss"] = proxy_loss(W, deq, H)
        stats["rtn_proxy_loss"] = proxy_loss(W, rtn(W, bits, cfg.clip_q).Q, H)
    return q, deq, stats


def _calibration_batches(calib: Tensor, cfg: QuantConfig) -> Tensor:
    T = cfg.calib_seq_len
    n = min(calib.numel() // T, cfg.calib_tokens // T)
    if n == 0:
        raise ValueError(f"calibration stream of {calib.numel()} tokens is shorter than one sequence of {T}")
    return calib[: n * T].view(n, T)


@torch.no_grad()
def _gptq_blocks(model: GPT, regime: Regime, cfg: QuantConfig, calib: Tensor, quantize: Callable) -> None:
    """Walk GPT.forward block by block, quantizing each group from its current inputs."""
    ids = _calibration_batches(calib, cfg)
    x = rms_norm(model.tok_emb(ids))
    x0 = x
    skips: list[Tensor] = []
    for i, block in enumerate(model.blocks):
        if i >= model.num_encoder_layers:
            j = i - model.num_encoder_layers
            if skips:
                x = x + model.skip_weights[j][None, None] * skips.pop()
        for group in BLOCK_GROUPS:
            modules = {f"blocks.{i}.{g}.weight": block.get_submodule(g) for g in group}
            modules = {n: m for n, m in modules.items() if is_quantized(n, m.weight, cfg)}
            if not modules:
                continue
            hess = _Hessians(modules)
            block(x, x0)
            for name, H in hess.close().items():
                quantize(name, modules[name], H)
        x = block(x, x0)
        if i < model.num_encoder_layers:
            skips.append(x)


def quantize_model(model: nn.Module, regime: Regime, cfg: QuantConfig = QuantConfig(),
                   calib: Tensor | None = None) -> tuple[nn.Module, QuantReport]:
    """A dequantized copy of `model` under `regime`, and its report."""
    t0 = time.perf_counter()
    report = QuantReport(regime.name, regime.method, regime.bits)
    out = copy.deepcopy(model).float().eval()
    state = out.state_dict()
    if regime.method == "fp":
        sizes = compressed_sizes(state)  # one torch.save + zlib + lzma pass, not two
        report.artifact_bytes_zlib, report.artifact_bytes_lzma = sizes["zlib"], sizes["lzma"]
        report.seconds = time.perf_counter() - t0
        return out, report
    if regime.method == "pg":
        obj = pg_int8.quantize_state_dict(state)
        blob = pg_int8.pack(obj)
        deq = pg_int8.dequantize_state_dict(pg_int8.unpack(blob))
        out.load_state_dict(deq)
        for name in obj["quantized"]:
            report.tensors.append({"name": name, "numel": state[name].numel(), "bits": 8,
                                   "rel_error": float((deq[name] - state[name]).norm() / state[name].norm())})
        report.quantized_params = sum(t["numel"] for t in report.tensors)
        report.artifact_bytes_zlib = len(blob)
        report.artifact_bytes_lzma = compressed_sizes(obj)["lzma"]
        report.seconds = time.perf_counter() - t0
        return out, report
    packed: dict[str, object] = {"codes": {}, "scales": {}, "passthrough": {}}
    params = dict(out.named_parameters())

    def quantize(name: str, module_or_none, H: Tensor | None) -> None:
        bits = cfg.embed_bits if name == EMBED else regime.bits
        q, deq, stats = _quantize_weight(name, params[name].detach(), bits, regime, cfg, H)
        params[name].data.copy_(deq)
        packed["codes"][name] = torch.frombuffer(bytearray(pack_codes(q.codes.cpu(), bits)), dtype=torch.uint8)
        packed["scales"][name] = q.scales.to(torch.float16).cpu()
        report.tensors.append(stats)

    if regime.method == "gptq":
        if not isinstance(out, GPT):
            raise ValueError(f"regime {regime.name}: GPTQ walks the parameter-golf GPT; {type(out).__name__} is not one")
        if calib is None:
            raise ValueError(f"regime {regime.name} needs calibration tokens from the train split")
        if is_quantized(EMBED, params[EMBED], cfg):
            quantize(EMBED, None, None)  # first: later layers calibrate on the quantized embedding
        _gptq_blocks(out, regime, cfg, calib, quantize)
    for name, p in params.items():
        if name in packed["codes"]:
            continue
        if is_quantized(name, p, cfg):
            quantize(name, None, None)
        else:
            stored = stored_passthrough(name, p.detach())
            packed["passthrough"][name] = stored.cpu()
            p.data.copy_(stored.float())
    report.quantized_params = sum(t["numel"] for t in report.tensors)
    sizes = compressed_sizes(packed)
    report.artifact_bytes_zlib, report.artifact_bytes_lzma = sizes["zlib"], sizes["lzma"]
    report.seconds = time.perf_counter() - t0
    return out, report
