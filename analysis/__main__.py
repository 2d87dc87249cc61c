"""python -m analysis RUN_DIR [--markdown]: write report.md/.html and figures into the run, print the key table.
python -m analysis --baselines DATA TOKENIZER: uniform, unigram and bigram bpb of a dataset's validation stream."""
from __future__ import annotations

import argparse
import sys

from analysis.report import caveats, key_table, markdown_key_table, selection_note, write_report
from analysis.runs import RunError, load_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split(":")[1].split(".")[0].strip())
    p.add_argument("run_dir", nargs="?", help="a run directory with trials.parquet (and curves.parquet, manifest.json)")
    p.add_argument("--markdown", action="store_true", help="print only the key table as Markdown (for a README or PR)")
    p.add_argument("--baselines", nargs=2, metavar=("DATA", "TOKENIZER"),
                   help="print uniform, unigram and bigram bpb of DATA's validation stream, tables counted on its train "
                   "split (the demo's: the run's manifest names them)")
    args = p.parse_args(argv)
    if args.baselines:
        from analysis.baselines import ngram_baselines

        try:
            b = ngram_baselines(*args.baselines)
        except (OSError, ValueError) as exc:
            print(f"analysis: error: {exc}", file=sys.stderr)
            return 2
        print(f"validation stream of {b['targets']:,} targets, {b['bytes']:,.0f} bytes; tables counted on "
              f"{b['train_tokens']:,} train tokens")
        for name in ("uniform", "unigram", "bigram"):
            print(f"{name:>8}: {b[name + '_bpb']:.4f} bpb")
        return 0
    if not args.run_dir:
        p.error("give RUN_DIR, or --baselines DATA TOKENIZER")
    try:
        run = load_run(args.run_dir)
    except RunError as exc:
        print(f"analysis: error: {exc}", file=sys.stderr)
        return 2
    if args.markdown:
        print(markdown_key_table(run), end="")
        return 0
    path = write_report(run)
    print(key_table(run.trials).to_string(index=False))
    print(f"best setting per regime {selection_note(run.trials)}")
    for note in caveats(run):
        print(f"note: {note}")
    print(f"report: {path} (and report.html, figures/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
