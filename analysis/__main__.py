"""python -m analysis runs/<name>: write report.md/.html and figures into the run, print the key table."""
from __future__ import annotations

import sys

import pandas as pd

from analysis.report import caveats, key_table, write_report
from analysis.tables import RunError, load_run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m analysis runs/<name>", file=sys.stderr)
        return 2
    try:
        run = load_run(argv[0])
    except RunError as exc:
        print(f"analysis: error: {exc}", file=sys.stderr)
        return 2
    path = write_report(run)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(key_table(run.trials).round(4).to_string(index=False))
    for note in caveats(run):
        print(f"note: {note}")
    print(f"report: {path} (and report.html, figures/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
