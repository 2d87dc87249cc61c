"""The one place that walks a model: quantize it under a regime, report the damage.

`quantize_model(model, regime, cfg, calib)` returns a new float model holding
the weights the stored artifact decodes to (the original is untouched) and a
report: what was quantized and why, artifact bytes (zlib and lzma),
per-tensor relative error, GPTQ's layer proxy loss where a Hessian exists,
and wall time. Any `nn.Module` that maps token ids to logits will do.

Which weights: every matrix the forward pass multiplies, chosen by
parameter, not by module class: weights of linear layers
(`quant.linear_types`, subclasses such as CastedLinear included), embedding
tables (at `quant.embed_bits`), and matrices no such module holds, found by
tracing one forward pass (`e2ettt.matrices`): a bare 2-D parameter, or each
slice of a bank applied with `F.linear`; each with more than
`quant.min_numel` elements and no `quant.keep_float` substring in its name.
A regime that would reach less than `quant.min_share` of the model's matrix
parameters above `quant.min_numel` is refused with one line naming what it
leaves out. A weight that several modules share (a tied embedding and head,
a block reused by recurrence) is one weight, quantized once. Everything else
passes through as parameter-golf stores it (control tensors fp32, other
floats fp16). The model keeps its own dtype: codes and scales are computed
in float32 and the decoded weights copied into the parameters.

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

import contextlib
import copy
import importlib
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from e2ettt.evaluate import autocast
from e2ettt.matrices import Matrix, bare_candidates, matrix_numel, matrix_view, trace, watch
from e2ettt.quant import artifact, pg_int8
from e2ettt.quant.gptq import gptq, proxy_loss
from e2ettt.quant.hadamard import Rotation
from e2ettt.quant.regimes import CONTROL_PATTERNS, QuantConfig, Regime
from e2ettt.quant.rtn import Quantized, quantize_with_scales, rtn


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
    grid: dict = field(default_factory=dict, repr=False)  # how each stored tensor reads back: `requantize_` re-encodes with it

    @property
    def artifact_bytes(self) -> int:
        """The headline size: lzma-compressed packed artifact."""
        return self.artifact_bytes_lzma


@dataclass
class Target:
    """One matrix to quantize: a module's weight, or one that no module holds (a bare parameter, a bank's slice)."""

    name: str  # the parameter's name; "bank.i" for slice i of a bank
    param: nn.Parameter
    linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    matrix: Matrix | None = None  # how the forward multiplies a matrix no module holds
    calls: int = 0  # ... and how often per forward

    @property
    def uses(self) -> list[str]:
        if self.matrix is not None:  # a bare table's `embeddings` marks it a table: its use is the traced one
            return [f"{self.matrix.op} in the forward pass ({self.calls}x)"]
        return [n for n, _ in self.linears] + self.embeddings

    @property
    def multiplied(self) -> bool:
        """Multiplied by activations (GPTQ can calibrate it), not only looked up."""
        return bool(self.linears) or (self.matrix is not None and self.matrix.op != "embedding")

    def weight(self) -> Tensor:
        """The matrix as (out, in), a view of the parameter."""
        return matrix_view(self.param, self.matrix) if self.matrix is not None else self.param

    def store_(self, W: Tensor) -> None:
        with torch.no_grad():
            self.weight().copy_(W)  # copy_ casts to the parameter's dtype and moves to its device


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


def select_targets(model: nn.Module, cfg: QuantConfig) -> dict[str, Target]:
    """The matrices a regime quantizes, keyed by name (a shared weight appears once)."""
    linear_types = module_classes(cfg.linear_types)
    keep = [k.strip() for k in cfg.keep_float.split(",") if k.strip()]
    first_name = {id(p): n for n, p in model.named_parameters()}
    targets: dict[str, Target] = {}
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
        t = targets.setdefault(name, Target(name, w))
        if is_linear and all(mod is not m for _, mod in t.linears):
            t.linears.append((mname, m))
        if is_embedding and mname not in t.embeddings:
            t.embeddings.append(mname)
    bare = bare_candidates(model, tuple(keep), linear_types)
    params = dict(model.named_parameters())
    for name, (mx, calls) in (trace(model, only=bare) if bare else {}).items():
        p = params[mx.param]
        if matrix_numel(p) <= cfg.min_numel or (mx.op == "embedding" and not cfg.embed_bits):
            continue
        targets[name] = Target(name, p, embeddings=["F.embedding"] if mx.op == "embedding" else [], matrix=mx,
                               calls=calls)
    return targets


def matrix_parameters(model: nn.Module, cfg: QuantConfig) -> dict[str, int]:
    """The model's matrix parameters a regime must reach: floating parameters of two or more dims, each of whose
    matrices (a bank's slices) has more than quant.min_numel elements, outside quant.keep_float (embedding tables
    only when quant.embed_bits quantizes them): name -> elements."""
    keep = [k.strip() for k in cfg.keep_float.split(",") if k.strip()]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: p.numel() for n, p in model.named_parameters()
            if p.ndim >= 2 and p.is_floating_point() and matrix_numel(p) > cfg.min_numel
            and not any(k in n for k in keep) and (cfg.embed_bits or id(p) not in embeddings)}


def require_targets(model: nn.Module, cfg: QuantConfig, regime: str) -> dict[str, Target]:
    """`select_targets`, or one line saying why the model cannot take `regime`: nothing to quantize, or less than
    quant.min_share of its matrix parameters reached."""
    targets = select_targets(model, cfg)
    if not targets:
        raise QuantSelectionError(
            f"regime {regime}: {type(model).__name__} has no weight to quantize (no {cfg.linear_types} or "
            f"nn.Embedding weight above quant.min_numel={cfg.min_numel:,} elements outside quant.keep_float, and no "
            "matrix the forward pass multiplies)")
    total = matrix_parameters(model, cfg)
    reached: dict[str, int] = {}
    for t in targets.values():
        pname = t.matrix.param if t.matrix is not None else t.name
        reached[pname] = reached.get(pname, 0) + t.weight().numel()
    share = sum(min(reached.get(n, 0), size) for n, size in total.items()) / max(1, sum(total.values()))
    if share < cfg.min_share:
        left = sorted(((size - reached.get(n, 0), n) for n, size in total.items() if reached.get(n, 0) < size),
                      reverse=True)
        named = ", ".join(f"{n} ({size:,})" for size, n in left[:4]) + (", ..." if len(left) > 4 else "")
        raise QuantSelectionError(
            f"regime {regime}: reaches {share:.0%} of {type(model).__name__}'s {sum(total.values()):,} matrix parameters "
            f"(quant.min_share={cfg.min_share:g}); not reached: {named}: no linear module, embedding or F.linear/matmul "
            "in a forward pass uses them; set quant.min_share to accept that share")
    return targets


def stored_passthrough(name: str, t: Tensor) -> Tensor:
    """A passthrough tensor as parameter-golf stores it (control fp32, other floats fp16)."""
    if not t.is_floating_point() or any(p in name for p in CONTROL_PATTERNS):
        return t
    return t.to(torch.float16)


class _StopForward(Exception):
    """Raised by a hook once a calibration pass has seen everything it needs."""


@contextlib.contextmanager
def _observe(model: nn.Module, targets: dict[str, Target], on_call):
    """Calls on_call(x, key) for every use of a target in a forward pass: module pre-hooks for module weights, the
    matrix tracer for matrices no module holds."""
    hooks = [m.register_forward_pre_hook(lambda _m, args, key=key: on_call(args[0], key))
             for key, t in targets.items() for _, m in t.linears]
    bare = {t.matrix.param for t in targets.values() if t.matrix is not None}

    def on_use(mx: Matrix, x):
        if x is not None and mx.name in targets:
            on_call(x, mx.name)

    try:
        with watch(model, on_use, only=bare) if bare else contextlib.nullcontext():
            yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def _call_groups(model: nn.Module, ids: Tensor, targets: dict[str, Target],
                 dtype: torch.dtype | None = None) -> tuple[list[list[str]], Counter]:
    """Groups of weights in the order the forward pass first uses them (consecutive calls on one input
    tensor form one group), and how often each weight is used per forward."""
    calls: list[tuple[str, bool]] = []  # (weight, same input object as the call before)
    last = [None]  # holding the previous input keeps its memory from being reused for the next one

    def record(x, key):
        calls.append((key, x is last[0]))
        last[0] = x

    try:
        with _observe(model, targets, record), autocast(ids.device, dtype):
            model(ids)
    finally:
        last[0] = None
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
def _group_hessians(model: nn.Module, ids: Tensor, targets: dict[str, Target], group: list[str],
                    uses: Counter, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """H = 2XᵀX/n of each weight in `group`, from one forward pass that stops after the group's last use."""
    cols = {k: targets[k].weight().shape[1] for k in group}
    sums = {k: torch.zeros(cols[k], cols[k], dtype=torch.float64, device=targets[k].param.device) for k in group}
    rows, seen = Counter(), Counter()

    def hook(x, key):
        if key not in sums:
            return
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[key] += x.T @ x
        rows[key] += x.shape[0]
        seen[key] += 1
        if all(seen[k] >= uses[k] for k in group):
            raise _StopForward

    try:
        with _observe(model, {k: targets[k] for k in group}, hook), autocast(ids.device, dtype):
            model(ids)
    except _StopForward:
        pass
    return {k: (2.0 * sums[k] / max(1, rows[k])).float() for k in group}


def _calibration_batches(calib: Tensor, cfg: QuantConfig) -> Tensor:
    T = cfg.calib_seq_len
    n = min(calib.numel() // T, cfg.calib_tokens // T)
    if n == 0:
        raise ValueError(f"calibration stream of {calib.numel()} tokens is shorter than one sequence of {T}")
    return calib[: n * T].view(n, T)


def quantize_model(model: nn.Module, regime: Regime, cfg: QuantConfig = QuantConfig(),
                   calib: Tensor | None = None, dtypes: dict[str, torch.dtype] | None = None,
                   autocast_dtype: torch.dtype | None = None) -> tuple[nn.Module, QuantReport]:
    """A copy of `model` (in its own dtype) holding the weights its stored artifact decodes to, and its report.

    `dtypes` are the checkpoint's own tensor dtypes (e.g. a bf16 embedding): the parameter-golf
    round trip restores each tensor to its original dtype, as parameter-golf's dequantizer does.
    GPTQ's calibration passes run under `autocast_dtype` (the trial's), as the records calibrate.
    """
    t0 = time.perf_counter()
    report = QuantReport(regime.name, regime.method, regime.bits,
                         regime.levels(cfg.grid) if regime.method in ("rtn", "gptq") else 0)
    out = copy.deepcopy(model).eval()
    if regime.method == "fp":
        sizes = artifact.compressed_sizes({k: v.detach().cpu() for k, v in out.state_dict().items()})
        report.artifact_bytes_zlib, report.artifact_bytes_lzma = sizes["zlib"], sizes["lzma"]
    elif regime.method == "pg":
        _pg_round_trip(out, report, dtypes or {})
    else:
        _quantize_packed(out, regime, cfg, calib, report, autocast_dtype)
    report.seconds = time.perf_counter() - t0
    return out, report


def _pg_round_trip(out: nn.Module, report: QuantReport, dtypes: dict[str, torch.dtype]) -> None:
    # copies: loading the round trip into `out` below writes into its tensors, which the errors compare against
    state = {k: v.detach().cpu().to(dtypes.get(k, v.dtype), copy=True) for k, v in out.state_dict().items()}
    obj = pg_int8.quantize_state_dict(state)
    blob = pg_int8.pack(obj)
    deq = pg_int8.dequantize_state_dict(pg_int8.unpack(blob))
    out.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in deq.items()})
    for name in obj["quantized"]:
        report.tensors.append({"name": name, "numel": state[name].numel(), "bits": 8,
                               "rel_error": float((deq[name].float() - state[name].float()).norm()
                                                  / state[name].float().norm().clamp_min(1e-12))})
    report.quantized_params = sum(t["numel"] for t in report.tensors)
    for name in obj["quantized"]:
        scales = obj["scales"][name].float()
        report.grid[name] = ({"kind": "codes", "param": name, "index": None, "transposed": False, "levels": 255,
                              "scales": scales.numpy(), "rotation_seed": -1} if scales.ndim else
                             {"kind": "scalar", "param": name, "scale": float(scales)})
    for name, t in obj["passthrough"].items():
        if t.is_floating_point() and t.dtype == torch.float16:
            report.grid[name] = {"kind": "fp16", "param": name, "index": None, "transposed": False}
    report.artifact_bytes_zlib = len(blob)
    report.artifact_bytes_lzma = artifact.compressed_sizes(obj)["lzma"]
    report.selection = {"rule": "parameter-golf int8_clean_per_row_v1: float tensors above 65,536 elements"}


def treated_share(targets: dict[int, Target], share: float, seed: int, embeddings: bool = False) -> set[int]:
    """The weights a regime with a share treats (linear weights; with `embeddings`, embedding tables too): all at
    share 1, else a seeded choice of round(share · n)."""
    keys = sorted((k for k, t in targets.items() if embeddings or not t.embeddings), key=lambda k: targets[k].name)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    return {keys[i] for i in order[: max(1, round(share * len(keys)))]}


def _weight_seed(cfg: QuantConfig, name: str) -> int:
    return cfg.rotation_seed * 1_000_003 + zlib.crc32(name.encode())


def _quantize_packed(out: nn.Module, regime: Regime, cfg: QuantConfig, calib: Tensor | None,
                     report: QuantReport, autocast_dtype: torch.dtype | None = None) -> None:
    """RTN, GPTQ and noise regimes: every selected weight stored as packed codes (or, untreated or noised, in fp16)
    and the model given exactly what the artifact decodes to."""
    targets = require_targets(out, cfg, regime.name)
    treated = treated_share(targets, regime.share, cfg.rotation_seed,
                            embeddings=regime.decode != "right" or regime.method == "noise")
    total = matrix_parameters(out, cfg)
    report.selection = {"linear_types": cfg.linear_types, "keep_float": cfg.keep_float, "min_numel": cfg.min_numel,
                        "embed_bits": cfg.embed_bits, "grid": cfg.grid, "share": regime.share,
                        "treated": sorted(targets[k].name for k in treated),
                        "matrix_parameters": sum(total.values()),
                        "reached": sum(t.weight().numel() for t in targets.values()),
                        "outside_modules": sorted(k for k, t in targets.items() if t.matrix is not None)}
    packed: dict = {"format": artifact.FORMAT, "quantized": {}, "passthrough": {}}
    wrong: dict[str, Tensor] = {}  # wrongly decoded weights: set after every layer has calibrated on the right ones

    def keep(key: str, W: Tensor) -> None:  # stored in fp16, as parameter-golf stores floats
        t = targets[key]
        half = W.detach().to(torch.float16)
        original = t.weight().detach().float()
        error = float((half.float() - original).norm() / original.norm().clamp_min(1e-12))
        packed["passthrough"][t.name] = half.cpu()
        t.store_(half)
        report.tensors.append({"name": t.name, "uses": t.uses, "numel": W.numel(), "bits": 16, "rel_error": error})

    def quantize(key: str, H: Tensor | None) -> None:
        t = targets[key]
        W = t.weight().detach().float().clone()
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
        t.store_(right)
        report.tensors.append(stats)

    if regime.method == "gptq":
        if calib is None:
            raise ValueError(f"regime {regime.name} needs calibration tokens from the train split")
        ids = _calibration_batches(calib, cfg).to(next(out.parameters()).device)
        for key in [k for k, t in targets.items() if not t.multiplied]:
            quantize(key, None)  # embeddings first: later layers calibrate on the quantized table
        groups, uses = _call_groups(out, ids, {k: t for k, t in targets.items() if t.multiplied}, autocast_dtype)
        for group in groups:
            for key, H in _group_hessians(out, ids, targets, group, uses, autocast_dtype).items():
                quantize(key, H)
        unused = [t.name for k, t in targets.items() if t.multiplied and k not in uses]
        if unused:
            report.notes.append(f"never called in the forward pass, so quantized by RTN: {unused}")
    for key, t in targets.items():
        if t.name not in packed["quantized"] and t.name not in packed["passthrough"]:
            quantize(key, None)
    for key, W in wrong.items():
        targets[key].store_(W)
    if wrong:
        report.notes.append(f"{len(wrong)} of {len(targets)} quantized weights decoded "
                            f"{'with another rotation' if regime.decode == 'mismatch' else 'without the inverse rotation'}")
    done = {id(t.param) for t in targets.values()}
    for name, tensor in out.state_dict(keep_vars=True).items():
        if id(tensor) in done or name in packed["quantized"] or name in packed["passthrough"]:
            continue  # a treated weight, possibly under a second name (tied)
        stored = stored_passthrough(name, tensor.detach()).cpu()
        packed["passthrough"][name] = stored
        tensor.data.copy_(stored.to(tensor.dtype))
    shared = [f"{t.name} (used by {', '.join(t.uses)})" for t in targets.values() if len(t.uses) > 1 or t.calls > 1]
    if shared:
        report.notes.append(f"shared weights quantized once, Hessian summed over every use: {shared}")
    if any(t.matrix is not None for t in targets.values()):
        report.notes.append(f"{sum(t.matrix is not None for t in targets.values())} matrices no linear module holds "
                            "(bare parameters or bank slices), found by tracing a forward pass")
    if any(p.dtype != torch.float32 for p in out.parameters()):
        report.notes.append("the model's own dtypes kept: decoded weights are cast into them as the records load them")
    report.quantized_params = sum(t["numel"] for t in report.tensors if t["bits"] < 16)
    sizes = artifact.compressed_sizes(packed)
    report.artifact_bytes_zlib, report.artifact_bytes_lzma = sizes["zlib"], sizes["lzma"]
    report.artifact = packed
    for t in targets.values():
        where = {"param": t.matrix.param if t.matrix is not None else t.name,
                 "index": t.matrix.index if t.matrix is not None else None,
                 "transposed": t.matrix.transposed if t.matrix is not None else False}
        if t.name in packed["quantized"]:
            e = packed["quantized"][t.name]
            report.grid[t.name] = {"kind": "codes", **where, "levels": e["levels"], "scales": e["scales"].float().numpy(),
                                   "rotation_seed": e["rotation_seed"]}
        else:
            report.grid[t.name] = {"kind": "fp16", **where}
    for name, stored in packed["passthrough"].items():
        if name not in report.grid and stored.dtype == torch.float16:
            report.grid[name] = {"kind": "fp16", "param": name, "index": None, "transposed": False}


@torch.no_grad()
def requantize_(model: nn.Module, grid: dict) -> None:
    """Put `model`'s weights back on a regime's grid, in place: each stored tensor re-encoded as the regime's
    artifact stores it (the same fp16 row scales and rotation, new codes; fp16 storage for fp16 tensors), so that
    what TTT learnt is measured as it would survive in the artifact. Weights must be plain (LoRA merged)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for g in grid.values():
        p = tensors[g["param"]]
        if g["kind"] == "scalar":
            p.copy_(torch.clamp(torch.round(p.float() / g["scale"]), -127, 127) * g["scale"])
            continue
        m = None if g["index"] is None and not g["transposed"] else Matrix("", g["param"], g["index"], g["transposed"], "")
        W = matrix_view(p, m) if m is not None else p
        if g["kind"] == "fp16":
            W.copy_(W.half())
            continue
        scales = torch.as_tensor(g["scales"], device=W.device)
        R = Rotation(W.shape[1], g["rotation_seed"]) if g["rotation_seed"] >= 0 else None
        Wr = R.apply(W.double()).float() if R else W.float()
        Q = quantize_with_scales(Wr, scales, g["levels"]).Q
        W.copy_((R.inverse(Q.double()).float() if R else Q).to(W.dtype))


def _quantize_weight(W: Tensor, levels: int, regime: Regime, cfg: QuantConfig, H: Tensor | None,
                     seed: int | None) -> Quantized:
    """Codes and scales of one weight (of W R when rotated: the input-side rotation y = (xR)(WR)ᵀ)."""
    R = Rotation(W.shape[1], seed) if seed is not None else None
    Wr = R.apply(W.double()).float() if R else W.float()
    Hr = R.conjugate(H.double()).float() if (R and H is not None) else H
    if Hr is not None and regime.method == "gptq":
        return gptq(Wr, Hr, levels, cfg.gptq_block, cfg.gptq_damp, cfg.act_order, cfg.clip_q)
    return rtn(Wr, levels, cfg.clip_q)

