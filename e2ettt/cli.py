"""`e2ettt` command line: build the demo, quantize under regimes, run TTT for one setting.

    e2ettt demo                                   # build (or reuse) the demo, print its validation bpb
    e2ettt quantize --regimes fp,int4,gptq-int4   # damage and artifact size per regime
    e2ettt ttt --regime int3 --inner-lr 0.03 --ranks 2 --set ttt.chunk_tokens=256
    e2ettt ttt --regime int3 --device cuda --ranks 8 ...  # one NCCL group over a machine's GPUs, bf16 autocast

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

from e2ettt.config import ConfigError, field_help, override, set_items, with_device_defaults
from e2ettt.demo import DEMO_SETTINGS
from e2ettt.quant.regimes import FORMS, QuantConfig, RegimeError, parse_regime
from e2ettt.recipes import RECIPES, recipe_updates
from e2ettt.source import SourceConfig
from e2ettt.ttt import TTTConfig


@dataclasses.dataclass(frozen=True)
class CLIConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    ttt: TTTConfig = dataclasses.field(default_factory=lambda: TTTConfig(max_tokens=16384))


def _common(p: argparse.ArgumentParser) -> None:
    def doc(key: str) -> str:
        return field_help(CLIConfig(), key)

    for flag in ("checkpoint", "data", "tokenizer", "model_fn"):
        p.add_argument(f"--{flag.replace('_', '-')}", default="", help=doc(f"source.{flag}"))
    p.add_argument("--model-output", default="logits", help=doc("source.model_output"))
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                   help=f"{doc('source.artifacts')} (repeatable)")
    p.add_argument("--artifact-fn", default="", help=doc("source.artifact_fn"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where models quantize, score and train; "
                   "cuda defaults ttt.dtype to bf16 (autocast), as the records run")
    p.add_argument("--ttt-recipe", default="", metavar="NAME", help=f"a TTT protocol by name, applied before --set: "
                   f"{', '.join(RECIPES)} (README: TTT protocols)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted setting, e.g. ttt.epochs=3 or quant.min_numel=4096 (repeatable)")


def build(args: argparse.Namespace) -> CLIConfig:
    updates = {"source.checkpoint": args.checkpoint, "source.data": args.data, "source.tokenizer": args.tokenizer,
               "source.model_fn": args.model_fn, "source.model_output": args.model_output,
               "source.artifacts": tuple(args.artifact), "source.artifact_fn": args.artifact_fn,
               **({} if args.checkpoint else DEMO_SETTINGS)}
    if args.ttt_recipe:  # a recipe's grid axes are one setting here: its first chunk size and inner lr
        for key, value in recipe_updates(args.ttt_recipe).items():
            key = {"grid.chunks": "ttt.chunk_tokens", "grid.inner_lrs": "ttt.inner_lr"}.get(key, key)
            updates[key] = value[0] if isinstance(value, tuple) else value
    return override(CLIConfig(), with_device_defaults({**updates, **set_items(args.set)}, args.device == "cuda"))


def cmd_demo(args, cfg: CLIConfig) -> int:
    from e2ettt.source import resolve

    inputs = resolve(cfg.source)
    print(json.dumps({"checkpoint": inputs.checkpoint, "tokenizer": inputs.tokenizer, "data": inputs.data,
                      **(inputs.demo or {})}, indent=2))
    if inputs.demo:
        print(f"demo validation bpb (eval_val, all validation tokens): {inputs.demo['val_bpb']:.4f}")
    return 0


def cmd_quantize(args, cfg: CLIConfig) -> int:
    from e2ettt.artifacts import load_regime_model, quantize_regime
    from e2ettt.data import eval_segment
    from e2ettt.evaluate import DeviceTables, as_tensor, eval_val
    from e2ettt.launch import rank_device
    from e2ettt.source import load_split, load_tables, load_target_bytes, resolve

    if args.device == "cuda":
        rank_device("cuda", 0)  # no GPU here: one line before any work
    inputs = resolve(cfg.source)
    names = args.regimes.split(",")
    names = ["fp"] * ("fp" not in names) + names + [n for n in cfg.source.artifact_names if n not in names]
    regimes = [parse_regime(r, inputs.artifacts) for r in names]
    val, val_bytes = load_split(inputs, "val"), load_target_bytes(inputs)
    tokens = as_tensor(eval_segment(val, cfg.ttt.max_tokens, cfg.ttt.seed, cfg.ttt.heldout_tokens), args.device)
    sidecar = None if val_bytes is None else eval_segment(val_bytes, cfg.ttt.max_tokens, cfg.ttt.seed, cfg.ttt.heldout_tokens)
    tables = DeviceTables.from_tables(load_tables(inputs), args.device).for_stream(sidecar)
    base = None
    print(f"{'regime':>20} {'bpb':>8} {'damage':>8} {'quantized':>10} {'zlib B':>10} {'lzma B':>10} {'seconds':>8}  weights")
    for regime in sorted(regimes, key=lambda r: r.method != "fp"):
        rep, state = quantize_regime(inputs, regime.name, cfg.quant, args.device, args.threads, cfg.ttt.dtype)
        q = load_regime_model(inputs, state, args.device, cfg.ttt.dtype)
        bpb = eval_val(q, tokens, cfg.ttt.context, tables, cfg.ttt.micro_batch, cfg.ttt.autocast_dtype).bpb
        base = bpb if regime.method == "fp" else base
        print(f"{regime.name:>20} {bpb:8.4f} {bpb - base:+8.4f} {rep['quantized_params']:>10,} {rep['artifact_bytes_zlib']:>10,} "
              f"{rep['artifact_bytes_lzma']:>10,} {rep['seconds']:8.2f}  {rep['decoder']}", flush=True)
    print(f"bpb: eval_val over {tokens.numel() - 1:,} validation tokens, context {cfg.ttt.context}; "
          "damage = bpb - bpb(fp); sizes are packed codes + fp16 scales + passthrough, compressed (your own artifact: "
          "its file size)")
    return 0


def cmd_ttt(args, cfg: CLIConfig) -> int:
    from e2ettt import artifacts
    from e2ettt.launch import rank_device, run_local
    from e2ettt.plan import make_trial, needs, plan_settings, segments
    from e2ettt.source import fingerprint, load_split, resolve
    from e2ettt.storage import Store
    from e2ettt.worker import run_trial_on_rank

    parse_regime(args.regime, cfg.source.artifact_names)
    if args.device == "cuda":
        rank_device("cuda", args.workers - 1)  # a machine with fewer GPUs than ranks: one line before any work
    ttt = override(cfg.ttt, {"inner_lr": args.lr} if args.lr is not None else {})
    inputs = resolve(cfg.source)
    val = load_split(inputs, "val")
    starts = segments(val, ttt.max_tokens, [ttt.seed], [ttt.chunk_tokens], ttt.heldout_tokens)  # bad seed, cap: one line
    fp = fingerprint(inputs)
    settings = plan_settings(fp, args.regime, [dataclasses.replace(ttt, seed=0)], starts, cfg.quant, args.device,
                             args.workers, own=inputs.artifacts)
    trial = make_trial(settings, inputs, args.workers, args.threads)
    store = Store(args.work_dir or tempfile.mkdtemp(prefix="e2ettt-"))
    values, _ = artifacts.prepare_local(needs(settings, fp, cfg.quant, args.device, ttt.dtype), inputs, cfg.quant,
                                        args.device, args.threads, store)
    (_, m, curve), = run_local(run_trial_on_rank, (trial, values), args.workers, args.device)
    print(f"{args.regime}: pre-quant {m.pre_quant_bpb:.4f}  post-quant {m.post_quant_bpb:.4f}  post-TTT {m.post_ttt_bpb:.4f} "
          f"bpb  (damage {m.damage:+.4f}, recovery {m.recovery:+.4f}, status {m.status})")
    print(f"{m.tokens_scored:,} tokens on {args.workers} {args.device} rank(s), {ttt.dtype}, in {m.ttt_seconds:.1f} s "
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
                   help=f"comma-separated regimes ({FORMS}); fp is measured first, each --artifact is added")
    t = sub.add_parser("ttt", help="static eval + score-first TTT for one regime and setting", formatter_class=fmt)
    _common(t)
    t.add_argument("--regime", default="int3", help=f"the quantization regime to heal: {FORMS}")
    t.add_argument("--inner-lr", "--lr", dest="lr", type=float, default=None, help="inner learning rate (default: ttt.inner_lr)")
    t.add_argument("--ranks", "--workers", dest="workers", type=int, default=1,
                   help="ranks in one process group on this machine (gloo on CPU, NCCL with --device cuda: one GPU each)")
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
