"""What every trial of a regime shares: its quantized weights and its static curves.

`quantize_regime` quantizes the source model under a regime (GPTQ
calibrating on the train split) and returns the report and the dequantized
weights as a dict of numpy arrays (a value: the sweep hands it to trials as
a Ray object, fetched once per node). `static_scores` scores those weights
without TTT over each trial stream, chunk by chunk with the exact windows,
batching, device and dtype the TTT loop uses at one rank, plus the
parameter-golf `eval_val` number of the same stream. Both run wherever the
caller puts them (on the sweep's GPU nodes, as Ray tasks); neither touches a
shared disk. `save_*`/`load_*` keep copies in a `Store`, keyed by hashes of
everything they depend on.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time

import numpy as np
import torch

from e2ettt import data
from e2ettt.config import config_hash
from e2ettt.evaluate import DeviceTables, Score, as_tensor, chunk_spans, eval_val, static_curve
from e2ettt.quant.apply import quantize_model, require_targets
from e2ettt.quant.regimes import QuantConfig, parse_regime
from e2ettt.source import Inputs, load_source_model, load_split, load_tables, set_threads, source_dtypes
from e2ettt.storage import Store
from e2ettt.ttt import TTTConfig

State = dict  # parameter name -> np.ndarray (float32), what the model evaluates and TTT starts from


def regime_key(fingerprint: str, regime: str, qcfg: QuantConfig, device: str) -> str:
    """Key of a regime's weights: inputs, regime, quant settings and the kind of device GPTQ ran on."""
    return f"{regime}-" + config_hash({"inputs": fingerprint, "regime": regime, "quant": dataclasses.asdict(qcfg),
                                       "device": device}, 16)


def windowing(cfg: TTTConfig) -> dict:
    """The settings a static curve depends on (the seed only through the segment it picks)."""
    return {"chunk_tokens": cfg.chunk_tokens, "context": cfg.context, "stride": cfg.stride or cfg.context,
            "micro_batch": cfg.micro_batch, "dtype": cfg.dtype, "max_tokens": cfg.max_tokens,
            "segment_seed": cfg.seed if cfg.max_tokens else 0}


def static_key(weights_key: str, cfg: TTTConfig, device: str) -> str:
    return f"{weights_key}/static-" + config_hash({**windowing(cfg), "device": device}, 16)


def eval_stream(inputs: Inputs, cfg: TTTConfig, val: np.ndarray | None = None) -> np.ndarray:
    """The validation tokens a trial evaluates (cap and seed applied; bad combinations raise).
    `val`: the validation split, when the caller already holds it (one read for many seeds)."""
    tokens = data.eval_segment(load_split(inputs, "val") if val is None else val, cfg.max_tokens, cfg.seed)
    chunk_spans(tokens.size - 1, cfg.chunk_tokens)  # raises if the chunk is larger than the stream
    return tokens


def quantize_regime(inputs: Inputs, regime: str, qcfg: QuantConfig, device: str = "cpu",
                    threads: int = 0) -> tuple[dict, State]:
    """Quantize the source model on `device`; return (report, dequantized weights)."""
    set_threads(threads)
    spec = parse_regime(regime)
    model = load_source_model(inputs).to(device)
    calib = None
    if spec.needs_calibration:
        calib = torch.as_tensor(load_split(inputs, "train", qcfg.calib_tokens + 1)).to(device)
    qmodel, report = quantize_model(model, spec, qcfg, calib, source_dtypes(inputs))
    summary = {**{f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "artifact"},
               "artifact_bytes": report.artifact_bytes, "device": device}
    return summary, {k: v.detach().float().cpu().numpy() for k, v in qmodel.state_dict().items()}


def check_regimes(inputs: Inputs, regimes: list[str], qcfg: QuantConfig) -> None:
    """Fail now, in the driver, if the model cannot take a regime (nothing to quantize, no train split for GPTQ)."""
    specs = [parse_regime(r) for r in regimes]
    if not any(s.method in ("rtn", "gptq") for s in specs):
        return
    require_targets(load_source_model(inputs), qcfg, next(s.name for s in specs if s.method in ("rtn", "gptq")))
    if any(s.needs_calibration for s in specs):
        data.find_shards(inputs.data, "train")  # GPTQ calibrates on the train split: its shards must exist


def load_regime_model(inputs: Inputs, state: State, device: torch.device | str = "cpu") -> torch.nn.Module:
    model = load_source_model(inputs)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.to(device).eval()


def static_scores(inputs: Inputs, state: State, cfgs: list[TTTConfig], device: str = "cpu",
                  threads: int = 0) -> list[dict]:
    """Per-chunk static scores of one regime's weights over each config's stream."""
    set_threads(threads)
    model = load_regime_model(inputs, state, device)
    tables = DeviceTables.from_tables(load_tables(inputs), device)
    val = load_split(inputs, "val")
    out = []
    for cfg in cfgs:
        t0 = time.perf_counter()
        tokens = as_tensor(eval_stream(inputs, cfg, val), device)
        spans = chunk_spans(tokens.numel() - 1, cfg.chunk_tokens)
        with torch.no_grad():
            curve = static_curve(model, tokens, spans, cfg.context, cfg.stride or None, tables, cfg.micro_batch,
                                 cfg.autocast_dtype)
            ev = eval_val(model, tokens, cfg.context, tables, cfg.micro_batch, cfg.autocast_dtype)
        out.append({"windowing": windowing(cfg), "device": device, "chunks": [[s.nll, s.bytes, s.tokens] for s in curve],
                    "eval_val": [ev.nll, ev.bytes, ev.tokens], "seconds": time.perf_counter() - t0})
    return out


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
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, buf)
    store.write_bytes(f"{key}/weights.pt", buf.getvalue())
    store.write_bytes(f"{key}/report.json", json.dumps(report, indent=1, default=float).encode())


def load_regime(store: Store, key: str) -> tuple[dict, State] | None:
    report, weights = store.read_bytes(f"{key}/report.json"), store.read_bytes(f"{key}/weights.pt")
    if report is None or weights is None:
        return None
    tensors = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    return json.loads(report), {k: v.numpy() for k, v in tensors.items()}


def save_static(store: Store, key: str, static: dict) -> None:
    store.write_bytes(f"{key}.json", json.dumps(static, default=float).encode())


def load_static(store: Store, key: str) -> dict | None:
    blob = store.read_bytes(f"{key}.json")
    return json.loads(blob) if blob is not None else None
