"""`e2ettt` command line: build the demo, quantize under regimes, run TTT for one setting.

    e2ettt demo                                   # build (or reuse) the demo, print its validation bpb
    e2ettt quantize --regimes fp,int4,gptq-int4   # damage and artifact size per regime
    e2ettt ttt --regime int3 --inner-lr 0.03 --workers 2 --set ttt.chunk_tokens=256

Model, data and tokenizer default to the embedded demo; --checkpoint,
--data and --tokenizer point at parameter-golf files instead. Settings are
dotted keys (`--set ttt.epochs=3`), shared with the sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

from e2ettt.config import ConfigError, override, set_items
from e2ettt.demo import DEMO_SETTINGS
from e2ettt.quant.regimes import QuantConfig, RegimeError, parse_regime
from e2ettt.source import SourceConfig
from e2ettt.ttt import TTTConfig


@dataclasses.dataclass(frozen=True)
class CLIConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    ttt: TTTConfig = dataclasses.field(default_factory=lambda: TTTConfig(max_tokens=16384))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="", help="parameter-golf final_model.pt or .int8.ptz (empty: the embedded demo)")
    p.add_argument("--data", default="", help="directory with *_train_*.bin and *_val_*.bin shards")
    p.add_argument("--tokenizer", default="", help="SentencePiece .model matching the checkpoint's vocabulary")
    p.add_argument("--model-fn", default="", help="module:function building any causal LM from the checkpoint path")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted setting, e.g. ttt.epochs=3 or quant.min_numel=4096 (repeatable)")


def build(args: argparse.Namespace) -> CLIConfig:
    updates = {"source.checkpoint": args.checkpoint, "source.data": args.data, "source.tokenizer": args.tokenizer,
               "source.model_fn": args.model_fn, **({} if args.checkpoint else DEMO_SETTINGS), **set_items(args.set)}
    return override(CLIConfig(), updates)


def cmd_demo(args, cfg: CLIConfig) -> int:
    from e2ettt.source import resolve

    inputs = resolve(cfg.source)
    print(json.dumps({"checkpoint": inputs.checkpoint, "tokenizer": inputs.tokenizer, "data": inputs.data,
                      **(inputs.demo or {})}, indent=2))
    if inputs.demo:
        print(f"demo validation bpb (eval_val, all validation tokens): {inputs.demo['val_bpb']:.4f}")
    return 0


def cmd_quantize(args, cfg: CLIConfig) -> int:
    import torch

    from e2ettt.artifacts import calibration_tokens
    from e2ettt.data import eval_segment
    from e2ettt.evaluate import DeviceTables, as_tensor, eval_val
    from e2ettt.quant.apply import quantize_model
    from e2ettt.source import load_source_model, load_split, load_tables, resolve, source_dtypes

    regimes = [parse_regime(r) for r in args.regimes.split(",")]
    inputs = resolve(cfg.source)
    model = load_source_model(inputs)
    dtypes = source_dtypes(inputs)
    tokens = as_tensor(eval_segment(load_split(inputs, "val"), cfg.ttt.max_tokens, cfg.ttt.seed))
    tables = DeviceTables.from_tables(load_tables(inputs))
    calib = torch.as_tensor(calibration_tokens(inputs, cfg.quant))
    base = eval_val(model, tokens, cfg.ttt.context, tables, cfg.ttt.micro_batch).bpb
    print(f"{'regime':>20} {'bpb':>8} {'damage':>8} {'quantized':>10} {'zlib B':>10} {'lzma B':>10} {'seconds':>8}")
    for regime in regimes:
        q, rep = quantize_model(model, regime, cfg.quant, calib if regime.needs_calibration else None, dtypes)
        bpb = eval_val(q, tokens, cfg.ttt.context, tables, cfg.ttt.micro_batch).bpb
        print(f"{regime.name:>20} {bpb:8.4f} {bpb - base:+8.4f} {rep.quantized_params:>10,} "
              f"{rep.artifact_bytes_zlib:>10,} {rep.artifact_bytes_lzma:>10,} {rep.seconds:8.2f}", flush=True)
    print(f"bpb: eval_val over {tokens.numel() - 1:,} validation tokens, context {cfg.ttt.context}; "
          "damage = bpb - bpb(unquantized); sizes are packed codes + fp16 scales + passthrough, compressed")
    return 0


def cmd_ttt(args, cfg: CLIConfig) -> int:
    from e2ettt import artifacts
    from e2ettt.launch import run_local
    from e2ettt.source import fingerprint, load_split, resolve
    from e2ettt.storage import Store
    from e2ettt.sweep import make_trial, plan_settings, segments
    from e2ettt.worker import run_trial_on_rank

    parse_regime(args.regime)
    ttt = override(cfg.ttt, {"inner_lr": args.lr} if args.lr is not None else {})
    inputs = resolve(cfg.source)
    val = load_split(inputs, "val")
    starts = segments(val, ttt.max_tokens, [ttt.seed], [ttt.chunk_tokens])  # bad seed, cap or chunk: one line
    fp = fingerprint(inputs)
    settings = plan_settings(fp, args.regime, [dataclasses.replace(ttt, seed=0)], starts, cfg.quant, "cpu", args.workers)
    trial = make_trial(settings, inputs, args.workers, args.threads)
    (setting, row), = trial.rows
    store = Store(args.work_dir or tempfile.mkdtemp(prefix="e2ettt-"))
    values = {}
    for regime, static in dict.fromkeys([("fp", row.fp_static), (args.regime, row.static)]):
        key = artifacts.weights_key(fp, regime, cfg.quant, "cpu")
        cached = artifacts.load_regime(store, key)
        if cached is None:
            cached = artifacts.quantize_regime(inputs, regime, cfg.quant, "cpu", args.threads)
            artifacts.save_regime(store, key, *cached)
        windowing = artifacts.Windowing.of(ttt, row.segment_start)
        values[key], values[static] = cached[1], artifacts.static_scores(inputs, cached[1], [windowing], "cpu", args.threads)[0]
    (_, m, curve), = run_local(run_trial_on_rank, (trial, values), args.workers)
    print(f"{args.regime}: pre-quant {m.pre_quant_bpb:.4f}  post-quant {m.post_quant_bpb:.4f}  post-TTT {m.post_ttt_bpb:.4f} "
          f"bpb  (damage {m.damage:+.4f}, recovery {m.recovery:+.4f}, status {m.status})")
    print(f"{m.tokens_scored:,} tokens on {args.workers} rank(s) in {m.ttt_seconds:.1f} s "
          f"({m.tokens_per_second:,.0f} tokens/s); first_chunk_delta {m.first_chunk_delta:.2e}")
    step = max(1, len(curve) // 12)
    print(f"{'chunk':>6} {'tokens':>8} {'static':>8} {'ttt':>8} {'running':>8} {'inner lr':>9}")
    for c in curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else []):
        print(f"{c.chunk:>6} {c.tokens_seen:>8,} {c.static_bpb:8.4f} {c.ttt_bpb:8.4f} {c.running_ttt_bpb:8.4f} {c.inner_lr:9.2e}")
    return 0 if m.status == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2ettt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    _common(sub.add_parser("demo", help="build or reuse the embedded demo", formatter_class=fmt))
    q = sub.add_parser("quantize", help="damage and artifact size of regimes", formatter_class=fmt)
    _common(q)
    q.add_argument("--regimes", default="fp,pg-int8,int8,int6,int4,int3,gptq-int4,gptq-int3,hadamard-gptq-int3",
                   help="comma-separated regimes: fp, pg-int8, intN, gptq-intN, hadamard-intN, hadamard-gptq-intN, ternary")
    t = sub.add_parser("ttt", help="static eval + score-first TTT for one regime and setting", formatter_class=fmt)
    _common(t)
    t.add_argument("--regime", default="int3", help="the quantization regime to heal")
    t.add_argument("--inner-lr", "--lr", dest="lr", type=float, default=None, help="inner learning rate (default: ttt.inner_lr)")
    t.add_argument("--workers", type=int, default=1, help="ranks (gloo processes on this machine)")
    t.add_argument("--work-dir", default="", help="where regime artifacts are cached (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        cfg = build(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return {"demo": cmd_demo, "quantize": cmd_quantize, "ttt": cmd_ttt}[args.cmd](args, cfg)
    except (ConfigError, RegimeError, ValueError, OSError) as exc:
        print(f"e2ettt {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
