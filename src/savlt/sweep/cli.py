"""``savlt sweep SWEEP.yaml --out DIR [--jobs N] [--set KEY=VALUE ...] [--dry-run] [-q]``.

Registered by savlt.cli. Exit status: 0 when every point is complete, 1 when a point failed
(the others still ran; re-running retries only the unfinished ones), 130 when interrupted, 2 for
a sweep file or configuration error (found before anything is trained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from savlt.io import text_table


def _print_failure(failure) -> None:
    from tqdm import tqdm

    indented = "\n".join(f"    {line}" for line in failure.tail.splitlines())
    tqdm.write(
        f"point {failure.name} failed (exit status {failure.returncode}); last lines of {failure.log}:\n{indented}",
        file=sys.stderr,
    )


def _dry_run(sweep, out: Path) -> int:
    from savlt.sweep.runner import SweepLayout, check_sweep_folder, classify_points, is_complete

    layout = SweepLayout(out)
    rows = []
    for point in sweep.points:
        folder = layout.run(point.name)
        state = (
            "complete (skipped)"
            if is_complete(folder)
            else "unfinished (redone)"
            if folder.exists()
            else "to train"
        )
        rows.append([point.name, state])
    print(text_table(["point", "state"], rows))
    check_sweep_folder(sweep, layout)  # a folder that is not a sweep's, or in a data root, is an error
    classify_points(sweep, layout)  # a finished run with another configuration is an error
    print(f"{len(sweep.points)} points, every configuration valid; nothing was trained")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from savlt.sweep import aggregate, load_sweep, run_sweep
    from savlt.sweep.aggregate import text_summary

    sweep = load_sweep(args.sweep, args.set or [])
    if args.dry_run:
        return _dry_run(sweep, args.out)
    # an interruption (Ctrl-C, `kill`, a closed terminal) is handled inside: the summary below
    # covers the points finished so far
    result = run_sweep(sweep, args.out, jobs=args.jobs, progress=not args.quiet, on_failure=_print_failure)
    summary = aggregate(args.out)
    print(text_summary(summary))
    print(
        f"{len(summary.complete)} of {len(sweep.points)} points complete "
        f"({len(result.trained)} trained now, {len(result.skipped)} earlier, {len(result.failed)} failed) "
        f"in {result.seconds:.0f} s"
    )
    print(f"summary: {summary.markdown}  {summary.csv}" + (f"  {summary.plot}" if summary.plot else ""))
    if result.interrupted:
        print("savlt: sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if result.failed:
        names = ", ".join(f.name for f in result.failed)
        print(
            f"savlt: {len(result.failed)} point(s) failed: {names}; logs in {Path(args.out) / 'logs'}; "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train a grid of runs (methods × shots × seeds …) and summarise mean ± std over seeds",
        description="Train every point of a sweep file (base: + grid:) as its own run folder under "
        "OUT/runs/, skipping finished points, then write OUT/summary.csv, summary.md and summary.png.",
    )
    p.add_argument("sweep", type=Path, help="sweep YAML file with base: and grid:")
    p.add_argument("--out", type=Path, required=True, help="sweep folder (re-use it to resume)")
    p.add_argument(
        "--jobs", type=int, default=1, help="points trained in parallel (one GPU each when there are GPUs)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a base value (e.g. --set model=tiny --set train.n_iters=3) or a grid axis "
        "(--set grid.seed=[5])",
    )
    p.add_argument("--dry-run", action="store_true", help="validate every point and list what would run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)
