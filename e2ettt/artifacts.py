"""What every trial of a regime shares: its quantized weights and its static curves, made once.

`quantize_regime` quantizes the source model under a regime (GPTQ
calibrating on the train split) and returns the report and the dequantized
weights as a dict of numpy arrays: a value, handed to trials as a Ray
object and fetched once per node. `static_scores` scores those weights
without TTT over each row's segment, chunk by chunk, with the exact
windows, batching, device and dtype the TTT loop uses at one rank, plus
the parameter-golf `eval_val` number of the same tokens. The driver's
`prepare` runs both as Ray tasks on the trials' kind of device (a GPU each
on a GPU sweep), `prepare_local` in this process (the CLI, the tests); both
keep copies in a `Store` under keys that hash everything they depend on,
so a resumed sweep reuses them. Nothing here reads a disk another node
wrote.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from e2ettt import data
from e2ettt.config import config_hash
from e2ettt.evaluate import DeviceTables, Score, as_tensor, eval_val, plan_spans, plan_windows, score_windows, static_curve
from e2ettt.quant.apply import quantize_model, require_targets
from e2ettt.quant.regimes import QuantConfig, parse_regime
from e2ettt.source import (
    Inputs,
    fit_artifact,
    load_source_model,
    load_split,
    load_tables,
    load_target_bytes,
    set_threads,
    source_dtypes,
)
from e2ettt.storage import Store
from e2ettt.ttt import DTYPES, TTTConfig


@dataclass(frozen=True)
class State:
    """A regime's weights as trials receive them: what the model evaluates and TTT starts from, and how each stored
    tensor reads back (`quant.apply.requantize_` puts adapted weights back on that grid)."""

    weights: dict  # parameter name -> np.ndarray (float32)
    grid: dict = dataclasses.field(default_factory=dict)  # stored tensor -> its grid (`QuantReport.grid`); empty: none


@dataclass(frozen=True)
class Windowing:
    """Everything a static curve depends on besides the weights and the device."""

    chunk_tokens: int
    context: int
    stride: int
    micro_batch: int
    dtype: str
    max_tokens: int
    segment_start: int
    prefix: int  # tokens before the segment that serve as context, never scored
    heldout: int = 0  # the stream's last targets, in no segment: the held-out slice
    by_document: bool = False  # chunks inside documents, windows reading nothing of the document before

    @classmethod
    def of(cls, cfg: TTTConfig, segment_start: int) -> Windowing:
        return cls(cfg.chunk_tokens, cfg.context, cfg.stride or cfg.context, cfg.micro_batch, cfg.dtype, cfg.max_tokens,
                   segment_start, min(cfg.context, segment_start), cfg.heldout_tokens, cfg.reset == "document")


def weights_key(fingerprint: str, regime: str, qcfg: QuantConfig, device: str, dtype: str = "fp32",
                artifact: dict | None = None) -> str:
    """Key of a regime's weights: inputs, regime, quant settings, the kind of device GPTQ ran on and the autocast it
    calibrated under; for your own artifact, its content and decoder instead of the quant settings."""
    key = {"inputs": fingerprint, "regime": regime, "quant": dataclasses.asdict(qcfg), "device": device}
    if dtype != "fp32":
        key["dtype"] = dtype
    if artifact is not None:
        key = {"inputs": fingerprint, "regime": regime, "artifact": artifact["sha256"], "format": artifact["format"],
               "device": device, "dtype": dtype}
    return f"{regime}-" + config_hash(key, 16)


def static_key(weights: str, windowing: Windowing, device: str) -> str:
    return f"{weights}/static-" + config_hash({**dataclasses.asdict(windowing), "device": device}, 16)


def quantize_regime(inputs: Inputs, regime: str, qcfg: QuantConfig, device: str = "cpu",
                    threads: int = 0, dtype: str = "fp32") -> tuple[dict, State]:
    """Quantize the source model on `device` (GPTQ calibrating under the `dtype` autocast), or decode your own
    artifact; return (report, the weights the model evaluates)."""
    set_threads(threads)
    spec = parse_regime(regime, inputs.artifacts)
    model = load_source_model(inputs, device, DTYPES[dtype])
    if spec.method == "own":
        return own_regime(inputs, regime, model, device)
    calib = None
    if spec.needs_calibration:
        calib = torch.as_tensor(calibration_tokens(inputs, qcfg)).to(device)
    qmodel, report = quantize_model(model, spec, qcfg, calib, source_dtypes(inputs), DTYPES[dtype])
    summary = {**{f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name not in ("artifact", "grid")},
               "artifact_bytes": report.artifact_bytes, "device": device,
               "decoder": "checkpoint: " + inputs.checkpoint_format if spec.method == "fp" else
               pg_int8_name if spec.method == "pg" else "e2ettt_packed_v1 (this regime's own codes and scales)"}
    return summary, State({k: v.detach().float().cpu().numpy() for k, v in qmodel.state_dict().items()}, report.grid)


pg_int8_name = "int8_clean_per_row_v1 (parameter-golf's round trip)"


def own_regime(inputs: Inputs, regime: str, model: torch.nn.Module, device: str) -> tuple[dict, State]:
    """Your own artifact as a regime: its decoded weights in the model, and how far each moved from the checkpoint."""
    t0 = time.perf_counter()
    entry = inputs.artifacts[regime]
    state, decoder = fit_artifact(inputs, regime, model)
    fp = model.state_dict()
    tensors = []
    for name, t in state.items():
        a, b = t.float().to(device), fp[name].float()
        if not torch.equal(a, b):
            tensors.append({"name": name, "numel": t.numel(), "rel_error": float((a - b).norm() / b.norm().clamp_min(1e-12))})
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    summary = {"regime": regime, "method": "own", "bits": 0, "levels": 0,
               "quantized_params": sum(t["numel"] for t in tensors), "artifact_bytes_zlib": entry["bytes"],
               "artifact_bytes_lzma": entry["bytes"], "artifact_bytes": entry["bytes"], "seconds": time.perf_counter() - t0,
               "selection": {"artifact": entry["path"], "sha256": entry["sha256"]}, "tensors": tensors, "device": device,
               "decoder": decoder, "notes": [f"your own artifact {entry['path']} ({entry['bytes']:,} bytes, its file size), "
                                             f"read as {decoder}; {len(tensors)} tensors differ from the checkpoint"]}
    return summary, State({k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()})


def calibration_tokens(inputs: Inputs, qcfg: QuantConfig) -> np.ndarray:
    """GPTQ's calibration sequences, drawn from across the train split (never validation)."""
    return data.spread_sequences(inputs.data, "train", qcfg.calib_tokens // qcfg.calib_seq_len, qcfg.calib_seq_len,
                                 inputs.vocab_size)


def check_regimes(inputs: Inputs, regimes: list[str], qcfg: QuantConfig) -> None:
    """Fail now, in the driver, if the model cannot take a regime (nothing to quantize, too small a share of its
    matrices reached, no train split for GPTQ)."""
    specs = [parse_regime(r, inputs.artifacts) for r in regimes]
    walks = [s for s in specs if s.method in ("rtn", "gptq", "noise")]
    if not walks:
        return
    require_targets(load_source_model(inputs), qcfg, walks[0].name)
    if any(s.needs_calibration for s in specs):
        data.find_shards(inputs.data, "train")  # GPTQ calibrates on the train split: its shards must exist


def load_regime_model(inputs: Inputs, state: State, device: torch.device | str = "cpu",
                      dtype: str = "fp32") -> torch.nn.Module:
    model = load_source_model(inputs, device, DTYPES[dtype])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.weights.items()})
    return model.to(device).eval()


def static_scores(inputs: Inputs, state: State, windowings: list[Windowing], device: str = "cpu",
                  threads: int = 0) -> list[dict]:
    """Per-chunk static scores of one regime's weights over each windowing's segment."""
    set_threads(threads)
    model = load_regime_model(inputs, state, device, windowings[0].dtype)
    tables = DeviceTables.from_tables(load_tables(inputs), device)
    val, val_bytes = load_split(inputs, "val"), load_target_bytes(inputs)
    out = []
    for w in windowings:
        t0 = time.perf_counter()
        tokens = as_tensor(data.segment(val, w.segment_start, w.max_tokens, w.prefix), device)
        sidecar = data.segment(val_bytes, w.segment_start, w.max_tokens, w.prefix) if val_bytes is not None else None
        spans = plan_spans(tokens, w.prefix + 1, tokens.numel() - 1 - w.prefix, w.chunk_tokens, w.by_document)
        dtype = DTYPES[w.dtype]
        with torch.no_grad():
            curve = static_curve(model, tokens, spans, w.context, w.stride, tables.for_stream(sidecar), w.micro_batch,
                                 dtype)
            ev = eval_val(model, tokens[w.prefix :], w.context,
                          tables.for_stream(None if sidecar is None else sidecar[w.prefix :]), w.micro_batch, dtype)
            held = heldout_score(model, val, val_bytes, w, tables, device)
        out.append({"windowing": dataclasses.asdict(w), "device": device,
                    "chunks": [[s.nll, s.bytes, s.tokens] for s in curve], "eval_val": [ev.nll, ev.bytes, ev.tokens],
                    "heldout": None if held is None else [held.nll, held.bytes, held.tokens],
                    "seconds": time.perf_counter() - t0})
    return out


def heldout_score(model: torch.nn.Module, val: np.ndarray, val_bytes: np.ndarray | None, w: Windowing,
                  tables: DeviceTables, device) -> Score | None:
    """The model's static score of the held-out slice (the stream's last `w.heldout` targets, which no segment
    touches), with the row's context, stride, batching and dtype; None without a slice."""
    span = data.heldout_span(val, w.max_tokens, w.heldout)
    if span is None:
        return None
    first, end = span
    lo = max(0, first - 1 - w.context)
    side = None if val_bytes is None else val_bytes[lo:end]
    with torch.no_grad():
        return score_windows(model, as_tensor(val[lo:end], device), plan_windows(first - lo, end - lo, w.context, w.stride),
                             tables.for_stream(side), w.micro_batch, DTYPES[w.dtype])


def static_objects(inputs: Inputs, state: State, windowings: list[Windowing], device: str = "cpu", threads: int = 0):
    """`static_scores` as a Ray task's returns: one object per windowing."""
    out = static_scores(inputs, state, windowings, device, threads)
    return out[0] if len(out) == 1 else tuple(out)


def scores(static: dict) -> list[Score]:
    return [Score(*c) for c in static["chunks"]]


def total(static: dict) -> Score:
    out = Score(0.0, 0.0, 0)
    for s in scores(static):
        out = out + s
    return out


# Copies in a Store: weights as a torch state dict (read back with weights_only=True), the rest as JSON.

def save_regime(store: Store, key: str, report: dict, state: State) -> None:
    buf = io.BytesIO()
    grid = {k: {f: torch.from_numpy(np.array(v)) if f == "scales" else v for f, v in g.items()} for k, g in state.grid.items()}
    torch.save({"weights": {k: torch.from_numpy(np.array(v)) for k, v in state.weights.items()}, "grid": grid}, buf)
    store.write_bytes(f"{key}/weights.pt", buf.getvalue())
    store.write_bytes(f"{key}/report.json", json.dumps(report, indent=1, default=float).encode())


def load_regime(store: Store, key: str) -> tuple[dict, State] | None:
    report, weights = store.read_bytes(f"{key}/report.json"), store.read_bytes(f"{key}/weights.pt")
    if report is None or weights is None:
        return None
    saved = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    if "weights" not in saved or "grid" not in saved:  # a copy from before regimes kept their grid: made again
        return None
    grid = {k: {f: v.numpy() if f == "scales" else v for f, v in g.items()} for k, g in saved["grid"].items()}
    return json.loads(report), State({k: v.numpy() for k, v in saved["weights"].items()}, grid)


def save_static(store: Store, key: str, static: dict) -> None:
    store.write_bytes(f"{key}.json", json.dumps(static, default=float).encode())


def load_static(store: Store, key: str) -> dict | None:
    blob = store.read_bytes(f"{key}.json")
    return json.loads(blob) if blob is not None else None


@dataclass(frozen=True)
class Needs:
    """The artifacts a sweep's trials read: weights key -> (regime, its draw seed), static key -> (weights key,
    windowing), and the autocast each regime's weights are made under (weights key -> dtype)."""

    weights: dict
    static: dict
    dtypes: dict = dataclasses.field(default_factory=dict)


def prepare_local(needs: Needs, inputs: Inputs, qcfg: QuantConfig, device: str = "cpu", threads: int = 0,
                  store: Store | None = None) -> tuple[dict, dict]:
    """The driver's `prepare` without Ray, in this process: every artifact in `needs` as a value by key, and each regime's
    quantization report (the Ray-free CLI and tests); weights kept in `store` are reused, new ones kept there."""
    values, reports = {}, {}
    for wkey, (regime, draw) in needs.weights.items():
        cached = load_regime(store, wkey) if store is not None else None
        if cached is None:
            cached = quantize_regime(inputs, regime, dataclasses.replace(qcfg, rotation_seed=draw), device, threads,
                                     needs.dtypes.get(wkey, "fp32"))
            if store is not None:
                save_regime(store, wkey, *cached)
        reports.setdefault(regime, cached[0])
        values[wkey] = cached[1]
    by_weights: dict[str, dict] = {}
    for skey, (wkey, windowing) in needs.static.items():
        by_weights.setdefault(wkey, {})[skey] = windowing
    for wkey, jobs in by_weights.items():
        for skey, static in zip(jobs, static_scores(inputs, values[wkey], list(jobs.values()), device, threads)):
            values[skey] = static
    return values, reports
