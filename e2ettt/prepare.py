"""What every trial of a regime shares, computed once and cached on disk.

`prepare_regime` quantizes the source model under a regime (GPTQ
calibrating on the train split) and stores the dequantized weights and the
report under `<root>/artifacts/<regime>-<hash>/`. `prepare_static` scores
that model without TTT over the trial's stream, chunk by chunk with the
exact windows and batching the TTT loop uses at one rank, plus the
parameter-golf `eval_val` number of the same stream. Both are keyed by
hashes of everything they depend on, written atomically, and skipped when
present.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from e2ettt import data
from e2ettt.config import config_hash
from e2ettt.evaluate import DeviceTables, Score, as_tensor, chunk_spans, eval_val, static_curve
from e2ettt.quant.apply import quantize_model
from e2ettt.quant.regimes import QuantConfig, parse_regime
from e2ettt.source import Inputs, load_source_model, load_split, load_tables
from e2ettt.ttt import TTTConfig


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def regime_dir(root: Path, inputs: Inputs, regime: str, qcfg: QuantConfig) -> Path:
    key = config_hash({"checkpoint": inputs.checkpoint, "mtime": os.path.getmtime(inputs.checkpoint),
                       "data": inputs.data, "regime": regime, "quant": dataclasses.asdict(qcfg)})
    return Path(root) / "artifacts" / f"{regime}-{key}"


def prepare_regime(root: Path, inputs: Inputs, regime: str, qcfg: QuantConfig, threads: int = 0) -> dict:
    """Quantize once; return the report (read back from disk when cached)."""
    out = regime_dir(root, inputs, regime, qcfg)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    if threads:
        torch.set_num_threads(threads)
    spec = parse_regime(regime)
    model = load_source_model(inputs)
    calib = None
    if spec.needs_calibration:
        calib = torch.as_tensor(load_split(inputs, "train")[: qcfg.calib_tokens + 1])
    qmodel, report = quantize_model(model, spec, qcfg, calib)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.pt.tmp{os.getpid()}"
    torch.save({k: v.detach().cpu() for k, v in qmodel.state_dict().items()}, tmp)
    os.replace(tmp, out / "model.pt")
    summary = {**{k: v for k, v in dataclasses.asdict(report).items() if k != "tensors"},
               "artifact_bytes": report.artifact_bytes, "dir": str(out), "tensors": report.tensors}
    write_json_atomic(out / "report.json", summary)
    return summary


def load_regime_model(inputs: Inputs, regime_path: str | Path) -> torch.nn.Module:
    model = load_source_model(inputs)
    state = torch.load(Path(regime_path) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def eval_stream(inputs: Inputs, cfg: TTTConfig) -> np.ndarray:
    """The validation tokens a trial evaluates (cap and seed applied)."""
    tokens = data.eval_segment(load_split(inputs, "val"), cfg.max_tokens, cfg.seed)
    chunk_spans(tokens.size - 1, cfg.chunk_tokens)  # raises if the chunk is larger than the stream
    return tokens


def windowing(cfg: TTTConfig) -> dict:
    """The settings a static curve depends on (the seed only matters under a cap)."""
    return {"chunk_tokens": cfg.chunk_tokens, "context": cfg.context, "stride": cfg.stride or cfg.context,
            "micro_batch": cfg.micro_batch, "dtype": cfg.dtype, "max_tokens": cfg.max_tokens,
            "segment_seed": cfg.seed if cfg.max_tokens else 0}


def static_path(regime_path: str | Path, cfg: TTTConfig) -> Path:
    return Path(regime_path) / f"static-{config_hash(windowing(cfg))}.json"


def prepare_static(inputs: Inputs, regime_path: str | Path, cfg: TTTConfig, threads: int = 0) -> dict:
    """Per-chunk static scores of a regime's model over a trial's stream (cached)."""
    path = static_path(regime_path, cfg)
    if path.is_file():
        return json.loads(path.read_text())
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tokens = as_tensor(eval_stream(inputs, cfg))
    model = load_regime_model(inputs, regime_path)
    tables = DeviceTables.from_tables(load_tables(inputs))
    spans = chunk_spans(tokens.numel() - 1, cfg.chunk_tokens)
    curve = static_curve(model, tokens, spans, cfg.context, cfg.stride or None, tables, cfg.micro_batch, cfg.autocast_dtype)
    ev = eval_val(model, tokens, cfg.context, tables, cfg.micro_batch, cfg.autocast_dtype)
    out = {"windowing": windowing(cfg), "chunks": [[s.nll, s.bytes, s.tokens] for s in curve],
           "eval_val": [ev.nll, ev.bytes, ev.tokens], "seconds": time.perf_counter() - t0}
    write_json_atomic(path, out)
    return out


def scores(static: dict) -> list[Score]:
    return [Score(*c) for c in static["chunks"]]


def total(static: dict) -> Score:
    out = Score(0.0, 0.0, 0)
    for s in scores(static):
        out = out + s
    return out
