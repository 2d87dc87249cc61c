"""Which parameters TTT adapts: all, norms/scales only, or LoRA adapters.

`select_params(model, spec, seed)` freezes everything else and returns the
trainable tensors. Specs: "all" (full-model E2E TTT), "norms" (every
parameter with fewer than two dimensions plus parameter-golf's control
tensors: q_gain, attn/mlp scales, resid_mix, skip weights), "lora:R"
(rank-R adapters W + B·A on every matrix the forward multiplies: each
linear layer's weight, and the matrices no linear module holds, bare
parameters or slices of a bank applied with F.linear, found by tracing a
forward pass (`e2ettt.matrices`); B starts at zero so the adapted model
starts as the original).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from e2ettt.matrices import Matrix, bare_candidates, trace
from e2ettt.quant.regimes import CONTROL_PATTERNS


class LoRA(nn.Module):
    """Parametrization weight -> weight + B @ A (Hu et al. 2021)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        A = torch.empty(rank, in_features)
        bound = 1.0 / math.sqrt(in_features)
        A.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.B @ self.A).to(weight.dtype)


class BankLoRA(nn.Module):
    """Parametrization of a parameter no linear module holds: each multiplied matrix (a 2-D parameter, or slices
    `index` of a bank) gets its own W + B·A, B starting at zero."""

    def __init__(self, param: Tensor, matrices: list[Matrix], rank: int, generator: torch.Generator):
        super().__init__()
        r, c = param.shape[-2:]
        self.transposed = matrices[0].transposed
        out_f, in_f = (c, r) if self.transposed else (r, c)
        A = torch.empty(len(matrices), rank, in_f)
        bound = 1.0 / math.sqrt(in_f)
        A.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(len(matrices), out_f, rank))
        self.register_buffer("index", torch.tensor([m.index or 0 for m in matrices]), persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        delta = (self.B @ self.A).to(weight.dtype)  # (k, out, in)
        if self.transposed:
            delta = delta.transpose(-1, -2)
        if weight.ndim == 2:
            return weight + delta[0]
        flat = weight.reshape(-1, *weight.shape[-2:])
        return flat.index_add(0, self.index, delta).view_as(weight)


def parse_spec(spec: str) -> tuple[str, int]:
    if spec in ("all", "norms"):
        return spec, 0
    if spec.startswith("lora:") and spec[5:].isdigit() and int(spec[5:]) > 0:
        return "lora", int(spec[5:])
    raise ValueError(f"unknown adapted-parameter spec {spec!r}; use 'all', 'norms' or 'lora:R' (R a positive integer)")


def select_params(model: nn.Module, spec: str, seed: int = 0) -> list[Tensor]:
    kind, rank = parse_spec(spec)
    if kind == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "norms":
        chosen = [p for n, p in model.named_parameters() if p.ndim < 2 or any(c in n for c in CONTROL_PATTERNS)]
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        bare = bare_candidates(model, CONTROL_PATTERNS)
        multiplied: dict[str, list[Matrix]] = {}
        for m, _ in (trace(model, only=bare) if bare else {}).values():  # traced before any parametrization
            if m.op != "embedding":
                multiplied.setdefault(m.param, []).append(m)
        for module in list(model.modules()):
            if isinstance(module, nn.Linear):
                out_f, in_f = module.weight.shape
                lora = LoRA(out_f, in_f, rank, generator).to(module.weight.device)
                parametrize.register_parametrization(module, "weight", lora)
                chosen += [lora.A, lora.B]
        for name, matrices in multiplied.items():
            owner, _, attr = name.rpartition(".")
            holder = model.get_submodule(owner) if owner else model
            param = getattr(holder, attr)
            lora = BankLoRA(param, sorted(matrices, key=lambda m: m.index or 0), rank, generator).to(param.device)
            parametrize.register_parametrization(holder, attr, lora)
            chosen += [lora.A, lora.B]
    for p in chosen:
        p.requires_grad_(True)
    if not chosen:
        raise ValueError(f"adapted-parameter spec {spec!r} selects no parameters in {type(model).__name__}"
                         + (" (no linear layer, and no matrix the forward pass multiplies)" if kind == "lora" else ""))
    return chosen


def merge_(model: nn.Module) -> nn.Module:
    """Fold every adapter into the weight it parametrizes (W + B·A becomes W): plain weights, as an artifact stores."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
