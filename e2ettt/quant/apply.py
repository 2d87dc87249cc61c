"""The one place that walks a model: quantize it under a regime, report the damage.

`quantize_model(model, regime, cfg, calib)` returns a new float model holding
the weights the stored artifact decodes to (the original is untouched) and a
report: what was quantized and why, artifact bytes (zlib and lzma),
per-tensor relative error, GPTQ's layer proxy loss where a Hessian exists,
and wall time. Any `nn.Module` that maps token ids to logits will do.

Which weights: those of linear layers (`quant.linear_types`, subclasses such
as CastedLinear included) and of embedding tables (at `quant.embed_bits`),
with more than `quant.min_numel` elements and no `quant.keep_float` substring
in their name. A weight that several modules share (a tied embedding and
head, a block reused by recurrence) is one weight, quantized once.
Everything else passes through as parameter-golf stores it (control
tensors fp32, other floats fp16).

GPTQ knows nothing of the architecture. A first forward pass over the
calibration tokens records the order in which linear layers are called and
which consecutive ones read the same input tensor (q, k and v of one
attention); those form a group. Then, group by group in that order, forward
pre-hooks sum XᵀX of the group's inputs — which already flow through every
layer quantized before — and the pass stops once every use of the group's
weights has been seen. A layer called twice, or a weight two layers share,
sums the inputs of all its uses. Embedding tables without a linear use are
quantized (RTN) first, so that every later layer calibrates on them.
"""
from __future__ import annotations

import copy
import importlib
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from e2ettt.quant import artifact, pg_int8
from e2ettt.quant.gptq import gptq, proxy_loss
from e2ettt.quant.hadamard import Rotation
from e2ettt.quant.regimes import QuantConfig, Regime
from e2ettt.quant.rtn import Quantized, rtn


@dataclass
class QuantReport:
    regime: str
    method: str
    bits: int
    levels: int = 0
    quantized_params: int = 0
    artifact_bytes_zlib: int = 0
    artifact_bytes_lzma: int = 0
    seconds: float = 0.0
    selection: dict = field(default_factory=dict)  # the rule that chose the quantized weights
    notes: list[str] = field(default_factory=list)
    tensors: list[dict] = field(default_factory=list)  # name, uses, numel, bits, rel_error, proxy_loss, rtn_proxy_loss
    artifact: dict | None = field(default=None, repr=False)  # the stored form (codes, fp16 scales, passthrough)

    @property
    def artifact_bytes(self) -> int:
        """The headline size: lzma-compressed packed artifact."""
        return self.artifact_bytes_lzma


@dataclass
class Target:
    """One weight to quantize and the modules that use it."""

    name: str
    param: nn.Parameter
    linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)

    @property
    def uses(self) -> list[str]:
        return [n for n, _ in self.linears] + self.embeddings


class QuantSelectionError(ValueError):
    """A regime that a model cannot take; the message says why."""


def module_classes(spec: str) -> tuple[type, ...]:
    out = []
    for path in (p.strip() for p in spec.split(",") if p.strip()):
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise QuantSelectionError(f"quant.linear_types: cannot import {path!r}") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise QuantSelectionError(f"quant.linear_types: {path!r} is not an nn.Module class")
        out.append(cls)
    return tuple(out)


def select_targets(model: nn.Module, cfg: QuantConfig) -> dict[int, Target]:
    """The weights a regime quantizes, keyed by parameter identity (a shared weight appears once)."""
    linear_types = module_classes(cfg.linear_types)
    keep = [k.strip() for k in cfg.keep_float.split(",") if k.strip()]
    first_name = {id(p): n for n, p in model.named_parameters()}
    targets: dict[int, Target] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        is_linear, is_embedding = isinstance(m, linear_types), isinstance(m, nn.Embedding)
        if not isinstance(w, nn.Parameter) or not (is_linear or is_embedding) or id(w) not in first_name:
            continue
        name = first_name[id(w)]
        if w.ndim != 2 or w.numel() <= cfg.min_numel or not w.is_floating_point() or any(k in name for k in keep):
            continue
        if is_embedding and not cfg.embed_bits:
            continue
        t = targets.setdefault(id(w), Target(name, w))
        if is_linear and all(mod is not m for _, mod in t.linears):
            t.linears.append((mname, m))
        if is_embedding and mname not in t.embeddings:
            t.embeddings.append(mname)
    return targets


def require_targets(model: nn.Module, cfg: QuantConfig, regime: str) -> dict[int, Target]:
    """`select_targets`, or one line saying why the model cannot take `regime`."""
    targets = select_targets(model, cfg)
    if not targets:
        raise QuantSelectionError(
            f"regime {regime}: {type(model).__name__} has no weight to quantize (no {cfg.linear_types} or "
            f"nn.Embedding weight above quant.min_numel={cfg.min_numel:,} elements outside quant.keep_float)")
    return targets


def stored_passthrough(name: str, t: Tensor) -> Tensor:
    """A passthrough tensor as parameter-golf stores it (control fp32, other floats fp16)."""
    if not t.is_floating_point() or any(p in name for p in pg_int8.CONTROL_PATTERNS):
        return t
    return t.to(torch.float16)


class _StopForward(Exception):
    """Raised by a hook once a calibration pass has seen everything it needs."""


@torch.no_grad()
def _call_groups(model: nn.Module, ids: Tensor, targets: dict[int, Target]) -> tuple[list[list[int]], Counter]:
    """Groups of weights in the order the forward pass first uses them (consecutive calls on one input
    tensor form one group), and how often each weight is used per forward."""
    calls: list[tuple[int, bool]] = []  # (weight, same input object as the call before)
    last = [None]  # holding the previous input keeps its memory from being reused for the next one

    def record(args, key):
        calls.append((key, args[0] is last[0]))
        last[0] = args[0]

    hooks = [m.register_forward_pre_hook(lambda _m, args, key=key: record(args, key))
             for key, t in targets.items() for _, m in t.linears]
    try:
        model(ids)
    finally:
        last[0] = None
        for h in hooks:
            h.remove()
    groups, placed = [], set()
    for key, same_input in calls:
        if key in placed:
            continue
        if groups and same_input and placed:
            groups[-1].append(key)
        else:
            groups.append([key])
        placed.add(key)
    return groups, Counter(key for key, _ in calls)


@torch.no_grad()
def _group_hessians(model: nn.Module, ids: Tensor, targets: dict[int, Target], group: list[int],
                    uses: Counter) -> dict[int, Tensor]:
    """H = 2XᵀX/n of each weight in `group`, from one forward pass that stops after the group's last use."""
    sums = {k: torch.zeros(targets[k].param.shape[1], targets[k].param.shape[1], dtype=torch.float64,
                           device=targets[k].param.device) for k in group}
    rows, seen = Counter(), Counter()

    def hook(_module, args, key):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums[key] += x.T @ x
        rows[key] += x.shape[0]
        seen[key] += 1
        if all(seen[k] >= uses[k] for k in group):
            raise _StopForward

    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: hook(mod, args, key))
             for key in group for _, m in targets[key].linears]
    try:
        model(ids)
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return {k: (2.0 * sums[k] / max(1, rows[k])).float() for k in group}


def _calibration_batches(calib: Tensor, cfg: QuantConfig) -> Tensor:
    T = cfg.calib_seq_len
    n = min(calib.numel() // T, cfg.calib_tokens // T)
    if n == 0:
        raise ValueError(f"calibration stream of {calib.numel()} tokens is shorter than one sequence of {T}")
    return calib[: n * T].view(n, T)


def quantize_model(model: nn.Module, regime: Regime, cfg: QuantConfig = QuantConfig(),
                   calib: Tensor | None = None, dtypes: dict[str, torch.dtype] | None = None) -> tuple[nn.Module, QuantReport]:
    """A copy of `model` holding the weights its stored artifact decodes to, and its report.

    `dtypes` are the checkpoint's own tensor dtypes (e.g. a bf16 embedding): the parameter-golf
    round trip restores each tensor to its original dtype, as parameter-golf's dequantizer does.
    """
    t0 = time.perf_counter()
    report = QuantReport(regime.name, regime.method, regime.bits,
                         regime.levels(cfg.grid) if regime.method in ("rtn", "gptq") else 0)
    out = copy.deepcopy(model).float().eval()
    if regime.method == "fp":
        sizes = artifact.compressed_sizes({k: v.detach().cpu() for k, v in out.state_dict().items()})
        report.artifact_bytes_zlib, report.artifact_bytes_lzma = sizes["zlib"], sizes["lzma"]
    elif regime.method == "pg":
        _pg_round_trip(out, report, dtypes or {})
    else:
        _quantize_packed(out, regime, cfg, calib, report)
    report.seconds = time.perf_counter() - t0
    return out, report


def _pg_round_trip(out: nn.Module, report: QuantReport, dtypes: dict[str, torch.dtype]) -> None:
    state = {k: v.detach().cpu().to(dtypes.get(k, v.dtype)) for k, v in out.state_dict().items()}
    obj = pg_int8.quantize_state_dict(state)
    blob = pg_int8.pack(obj)
    deq = pg_int8.dequantize_state_dict(pg_int8.unpack(blob))
    out.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in deq.items()})
    for name in obj["quantized"]:
        report.tensors.append({"name": name, "numel": state[name].numel(), "bits": 8,
                               "rel_error": float((deq[name].float() - state[name].float()).norm()
                                                  / state[name].float().norm().clamp_min(1e-12))})
    report.quantized_params = sum(t["numel"] for t in report.tensors)
    report.artifact_bytes_zlib = len(blob)
    report.artifact_bytes_lzma = artifact.compressed_sizes(obj)["lzma"]
    report.selection = {"rule": "parameter-golf int8_clean_per_row_v1: float tensors above 65,536 elements"}


def treated_share(targets: dict[int, Target], share: float, seed: int, embeddings: bool = False) -> set[int]:
    """The weights a regime with a share treats (linear weights; with `embeddings`, embedding tables too): all at
    share 1, else a seeded choice of round(share · n)."""
    keys = sorted((k for k, t in targets.items() if embeddings or not t.embeddings), key=lambda k: targets[k].name)
    if share >= 1:
        return set(keys)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    return {keys[i] for i in order[: max(1, round(share * len(keys)))]}


def _weight_seed(cfg: QuantConfig, name: str) -> int:
    return cfg.rotation_seed * 1_000_003 + zlib.crc32(name.encode())


def _quantize_packed(out: nn.Module, regime: Regime, cfg: QuantConfig, calib: Tensor | None,
                     report: QuantReport) -> None:
    """RTN, GPTQ and noise regimes: every selected weight stored as packed codes (or, untreated or noised, in fp16)
    and the model given exactly what the artifact decodes to."""
    targets = require_targets(out, cfg, regime.name)
    treated = treated_share(targets, regime.share, cfg.rotation_seed,
                            embeddings=regime.decode != "right" or regime.method == "noise")
    report.selection = {"linear_types": cfg.linear_types, "keep_float": cfg.keep_float, "min_numel": cfg.min_numel,
                        "embed_bits": cfg.embed_bits, "grid": cfg.grid, "share": regime.share,
                        "treated": sorted(targets[k].name for k in treated)}
    packed: dict = {"format": artifact.FORMAT, "quantized": {}, "passthrough": {}}
    wrong: dict[int, Tensor] = {}  # wrongly decoded weights: set after every layer has calibrated on the right ones

    def keep(key: int, W: Tensor) -> None:  # stored in fp16, as parameter-golf stores floats
        t = targets[key]
        stored = W.detach().to(torch.float16).cpu()
        original = t.param.detach().float()
        error = float((stored.float().to(original.device) - original).norm() / original.norm().clamp_min(1e-12))
        packed["passthrough"][t.name] = stored
        t.param.data.copy_(stored.to(t.param.dtype))
        report.tensors.append({"name": t.name, "uses": t.uses, "numel": W.numel(), "bits": 16, "rel_error": error})

    def quantize(key: int, H: Tensor | None) -> None:
        t = targets[key]
        W = t.param.detach().clone()
        if regime.method == "noise":
            if key in treated:
                g = torch.Generator().manual_seed(_weight_seed(cfg, t.name))
                rms = W.float().square().mean(dim=1, keepdim=True).sqrt()
                return keep(key, W + regime.noise * rms * torch.randn(W.shape, generator=g).to(W))
            return keep(key, W)
        if not t.embeddings and regime.decode == "right" and key not in treated:
            return keep(key, W)  # a share of the weights: the rest stay float
        embedding = bool(t.embeddings)
        bits = cfg.embed_bits if embedding else regime.bits
        levels = (2**bits - (cfg.grid == "symmetric")) if embedding else regime.levels(cfg.grid)
        seed = _weight_seed(cfg, t.name) if regime.rotate else None
        q = _quantize_weight(W, levels, regime, cfg, H, seed)
        e = artifact.entry(q.codes, q.scales, bits, levels, seed)
        right = artifact.decode_entry(e).to(W.device)  # what a right decode gives, bit for bit
        if key in treated and regime.decode != "right":
            e["rotation_seed"] = seed + 1 if regime.decode == "mismatch" else -1  # stored: the decode that is evaluated
            wrong[key] = artifact.decode_entry(e).to(W.device)
        packed["quantized"][t.name] = e
        evaluated = wrong.get(key, right)
        stats = {"name": t.name, "uses": t.uses, "shared": len(t.uses) > 1, "numel": W.numel(), "bits": bits,
                 "levels": levels, "decode": e["rotation_seed"] if key in wrong else "right",
                 "rel_error": float((evaluated - W).norm() / W.norm().clamp_min(1e-12))}
        if H is not None:
            stats["proxy_loss"] = proxy_loss(W, right, H)
            stats["rtn_proxy_loss"] = proxy_loss(W, rtn(W, levels, cfg.clip_q).Q, H)
        t.param.data.copy_(right)
        report.tensors.append(stats)

    if regime.method == "gptq":
        if calib is None:
            raise ValueError(f"regime {regime.name} needs calibration tokens from the train split")
        ids = _calibration_batches(calib, cfg).to(next(out.parameters()).device)
        for key in [k for k, t in targets.items() if not t.linears]:
            quantize(key, None)  # embeddings first: later layers calibrate on the quantized table
        groups, uses = _call_groups(out, ids, {k: t for k, t in targets.items() if t.linears})
        for group in groups:
            for key, H in _group_hessians(out, ids, targets, group, uses).items():
                quantize(key, H)
        unused = [t.name for k, t in targets.items() if t.linears and k not in uses]
        if unused:
            report.notes.append(f"never called in the forward pass, so quantized by RTN: {unused}")
    for key, t in targets.items():
        if t.name not in packed["quantized"] and t.name not in packed["passthrough"]:
            quantize(key, None)
    for key, W in wrong.items():
        targets[key].param.data.copy_(W)
    if wrong:
        report.notes.append(f"{len(wrong)} of {sum(1 for t in targets.values() if t.linears)} linear weights decoded "
                            f"{'with another rotation' if regime.decode == 'mismatch' else 'without the inverse rotation'}")
    done = {id(t.param) for t in targets.values()}
    for name, tensor in out.state_dict(keep_vars=True).items():
        if id(tensor) in done or name in packed["quantized"] or name in packed["passthrough"]:
            continue  # a treated weight, possibly under a second name (tied)
        stored = stored_passthrough(name, tensor.detach()).cpu()
        packed["passthrough"][name] = stored
        tensor.data.copy_(stored.to(tensor.dtype))
    shared = [f"{t.name} (used by {', '.join(t.uses)})" for t in targets.values() if len(t.uses) > 1]
    if shared:
        report.notes.append(f"shared weights quantized once, Hessian summed over every use: {shared}")
    report.quantized_params = sum(t["numel"] for t in report.tensors if t["bits"] < 16)
    sizes = artifact.compressed_sizes(packed)
    report.artifact_bytes_zlib, report.artifact_bytes_lzma = sizes["zlib"], sizes["lzma"]
    report.artifact = packed


def _quantize_weight(W: Tensor, levels: int, regime: Regime, cfg: QuantConfig, H: Tensor | None,
                     seed: int | None) -> Quantized:
    """Codes and scales of one weight (of W R when rotated: the input-side rotation y = (xR)(WR)ᵀ)."""
    R = Rotation(W.shape[1], seed) if seed is not None else None
    Wr = R.apply(W.double()).float() if R else W.float()
    Hr = R.conjugate(H.double()).float() if (R and H is not None) else H
    if Hr is not None and regime.method == "gptq":
        return gptq(Wr, Hr, levels, cfg.gptq_block, cfg.gptq_damp, cfg.act_order, cfg.clip_q)
    return rtn(Wr, levels, cfg.clip_q)

