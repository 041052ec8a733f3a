"""The ``savlt`` command: a thin layer over the library (every command has a Python API twin).

Errors that are the user's to fix (bad data, bad options, missing weights) are printed as one
clear line and exit with status 2; a traceback means a bug in SAVLT.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from savlt.config import add_config_arguments, config_from_args
from savlt.errors import SavltError
from savlt.io import NO_SPACE, PlainTextFormatter, no_space_message, plain_json, plain_text
from savlt.methods import METHODS
from savlt.processes import refuse_in_a_starting_worker, stop_signals

# ------------------------------------------------------------------------------ commands


def cmd_synth(args: argparse.Namespace) -> int:
    from savlt.data.synth import PRETRAIN_SCANNERS, generate_dataset, generate_pretrain_corpus

    kwargs = {"size": tuple(args.size)} if args.size else {}
    if args.pretrain:
        scanners = [c.strip() for c in (args.centers or ",".join(PRETRAIN_SCANNERS)).split(",") if c.strip()]
        summary = generate_pretrain_corpus(
            args.out, seed=args.seed, per_class=args.per_class, scanners=scanners, **kwargs
        )
        print(
            f"wrote {summary.total} captioned scans from {len(summary.counts)} scanners to "
            f"{summary.out / 'pairs.csv'} ({summary.seconds:.1f} s)"
        )
        return 0
    centers = [c.strip() for c in (args.centers or "mixed,xiangya,huaxi").split(",") if c.strip()]
    summary = generate_dataset(
        args.out,
        seed=args.seed,
        per_class=args.per_class,
        centers=centers,
        preview=args.preview,
        patients_per_class=args.patients_per_class,
        volume_fraction=args.volumes,
        **kwargs,
    )
    total = sum(sum(c.values()) for c in summary.counts.values())
    print(f"wrote {total} images in {len(summary.counts)} centers to {summary.out} ({summary.seconds:.1f} s)")
    if summary.patients:
        print(
            f"from {summary.patients} patients ({summary.volumes} as multi-page TIFF volumes), listed in "
            "<center>/metadata.csv"
        )
    if summary.preview is not None:
        print(f"contact sheet: {summary.preview}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from savlt.engine.pretrain import pretrain

    flags = {
        "pretrain.pairs": args.pairs,
        "model.backbone": args.model,
        "pretrain.max_steps": args.max_steps,
        "pretrain.adapters": args.adapters,
        "pretrain.seed": args.seed,
    }
    import torch

    dtype = torch.float16 if args.float16 else torch.float32
    recall = pretrain(config_from_args(args, flags), args.out, progress=not args.quiet, save_dtype=dtype)
    print("held-out recall: " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))
    print(
        f"pretrained model: {args.out} (use it with --model {args.out}); model card: {args.out / 'README.md'}"
    )
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from savlt.data.check import check_dataset
    from savlt.data.quality import Thresholds

    cfg = config_from_args(args)
    class_map = cfg.class_map()
    report = check_dataset(
        args.root,
        class_map,
        progress=not args.quiet,
        thresholds=Thresholds.of(cfg),
        patient_pattern=cfg.data.patient_pattern,
    )
    print(report.render())
    return 0 if report.clean else 1


def cmd_fewshot_import(args: argparse.Namespace) -> int:
    from savlt.data.discover import scan_data
    from savlt.data.published import import_published_few_shot, save_few_shot

    cfg = config_from_args(args, {"data.root": args.data, "data.train_center": args.center})
    class_map = cfg.class_map()
    scan = scan_data(cfg.data.root, class_map, [cfg.data.train_center])
    few = import_published_few_shot(args.file, scan.center(cfg.data.train_center), class_map, args.seed)
    save_few_shot(args.out, few, cfg.data.root)
    print(
        f"wrote {few.shots}-shot lists of center {few.center} ({len(few.train)} training, {len(few.val)} "
        f"validation scans, protocol {few.protocol}) to {args.out}; train on them with "
        f"--set data.fewshot_file={args.out} and the authors' split as data.split_file"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from savlt.engine.training import train
    from savlt.report.summary import decision_table, results_table

    flags = {
        "data.root": args.data,
        "train.shots": args.shots,
        "train.seed": args.seed,
        "model.backbone": args.model,
        "method": args.method,
        "roi.segmenter": args.segmenter,
    }
    cfg = config_from_args(args, flags)
    inputs = {"config file": args.config} if args.config else None
    metrics = train(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite, inputs=inputs)
    if PartialState().is_main_process:  # under `accelerate launch`, one process reports
        print(results_table(metrics))
        print(decision_table(metrics))
        print(f"run folder: {args.out}   report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_train_points(args: argparse.Namespace) -> int:
    """Each --point CONFIG OUT LOG as ``savlt train --config CONFIG --out OUT -q``, one after the
    other in this process, its output appended to LOG; 1 when one failed (the others still ran),
    130 when interrupted. What a sweep runs for points that train in under a second (the
    feature-based baselines), so that the start-up is paid once."""
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from savlt.sweep.runner import GROUP_DONE

    failed = 0
    for config, out, log in args.point:
        with open(log, "a", encoding="utf-8") as stream, redirect_stdout(stream), redirect_stderr(stream):
            logging.getLogger().handlers.clear()  # the point's console log goes to its own file
            try:
                code = main(["train", "--config", config, "--out", out, "-q"])
            except Exception:  # a bug in one point is that point's failure, reported in its log
                traceback.print_exc()
                code = 1
            print(f"{GROUP_DONE} {code}", flush=True)
        if code == 130:
            return 130
        failed += code != 0
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from savlt.report.compare import comparison_table, read_metrics

    runs = [(Path(run).name, read_metrics(run)) for run in args.runs]
    print(comparison_table(runs))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from savlt.engine.loaded import load_run
    from savlt.report.summary import decision_table, results_table

    run = load_run(args.run)
    centers = [c.strip() for c in args.centers.split(",")] if args.centers else None
    out = args.out or Path(args.run) / "evaluation"
    metrics = run.evaluate(args.data, centers, out=out, progress=not args.quiet, overwrite=args.overwrite)
    print(results_table(metrics))
    print(decision_table(metrics))
    print(f"metrics: {Path(out) / 'metrics.json'}   report: {Path(out) / 'report.md'}")
    return 0


def predict_inputs(paths: list[Path]) -> list[Path]:
    """The files to predict: files as given, folders searched recursively for images (debris and
    other files left out, counted on stderr; a subfolder named ``masks``, where a data root's
    center keeps its tissue masks, is skipped with a note); a multi-page TIFF volume gives each of
    its pages."""
    from savlt.data.discover import MASKS, image_files
    from savlt.data.imageio import IMAGE_EXTENSIONS, volume_pages

    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)  # a missing or unreadable file is reported with the others at the end
            continue
        images, others = image_files(path)
        masks = [i for i in images if MASKS in i.relative_to(path).parts[:-1]]
        if masks:
            print(
                f"{path}: {len(masks)} file(s) in {MASKS}/ folders skipped (tissue masks, not scans)",
                file=sys.stderr,
            )
            images = [i for i in images if i not in set(masks)]
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise SavltError(
                f"folder {path} holds no scans (looked for {extensions}, in every subfolder but {MASKS}/)"
            )
        if others:
            print(f"{path}: {len(others)} file(s) that are not images left out", file=sys.stderr)
        found += images
    return volume_pages(found)


def referral_note(run) -> str:
    """What the probabilities, the screen and the prediction sets of ``predict`` rest on."""
    from savlt.engine.calibration import UNCALIBRATED_RULE

    fit = run.calibration
    if fit is None:
        return f"probabilities not calibrated; {UNCALIBRATED_RULE}"
    sets = (
        f"; prediction sets at coverage {1 - fit.conformal_alpha:g} ({fit.conformal_score.upper()} score, "
        f"{fit.scans} validation scans)"
        if fit.conformal_alpha is not None and fit.conformal_score is not None
        else ""
    )
    return f"calibrated probabilities (temperature {fit.temperature:.3g}); {fit.rule()}{sets}"


def screen_cell(prediction) -> str:
    """The screen of one scan for the terminal, saying when it fell back to the predicted class."""
    if prediction.operating_point_established is False:
        return f"{prediction.referral} (predicted class; operating point not established)"
    return prediction.referral


def set_cell(prediction) -> str:
    from savlt.classes import short_name

    if prediction.prediction_set is None:
        return "n/a"
    if not prediction.prediction_set:
        return "{} (less sure than of the validation scans)"
    return "{" + ", ".join(short_name(n) for n in prediction.prediction_set) + "}"


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from savlt.classes import short_name
    from savlt.engine.loaded import HEATMAP_FOLDER, check_prediction_csv, load_run, write_prediction_csv
    from savlt.io import check_outside_data, text_table

    images = predict_inputs(args.images)
    run = load_run(args.run)
    if args.csv is not None:
        check_prediction_csv(args.csv, args.images, run.cfg.data.root)
    if args.heatmap is not None:  # heat maps in a folder predicted would be taken for scans next time
        folders = [path for path in args.images if path.is_dir()]
        check_outside_data(args.heatmap, folders, HEATMAP_FOLDER, "the input folder", holding=False)
    predictions = run.predict(images, heatmap_dir=args.heatmap, progress=not args.quiet, skip_unreadable=True)
    failed = [p for p in predictions if p.error is not None]
    if args.csv is not None:
        write_prediction_csv(args.csv, predictions, run.class_names)
    if args.json:
        print(json.dumps(plain_json([p.to_json() for p in predictions]), indent=1))
    else:
        header = [
            "image",
            "predicted",
            "p(high-risk)",
            "screen",
            "prediction set",
            "ROI y0",
            *(short_name(n) for n in run.class_names),
        ]
        rows = [
            [
                plain_text(p.path),
                short_name(p.predicted),
                f"{p.high_risk_probability:.3f}",
                screen_cell(p),
                set_cell(p),
                f"{p.roi_box[1]:.3f}" + (" (whole image)" if p.roi_fallback else ""),
                *(f"{p.probabilities[n]:.3f}" for n in run.class_names),
            ]
            for p in predictions
            if p.predicted is not None
        ]
        if rows:
            print(text_table(header, rows))
            print(referral_note(run))
        for p in predictions:
            if p.reason is not None:
                print(plain_text(f"{p.path}: not assessable, no diagnosis: {p.reason}"))
        if args.heatmap:
            print(f"heat maps: {args.heatmap}")
        if args.csv is not None:
            print(f"CSV: {args.csv}")
    if failed:
        print(f"savlt: {len(failed)} of {len(predictions)} image(s) could not be read:", file=sys.stderr)
        for p in failed:
            print(f"  {plain_text(p.error)}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from savlt.config import config_reference, reference_markdown

    if args.markdown:
        print(reference_markdown(), end="")
    elif args.list:
        for row in config_reference():
            note = "" if row.defines_run else "  (does not define a run)"
            print(f"{row.key}  {row.type} = {row.default}{note}\n    {row.help}")
    else:
        print(config_from_args(args).to_yaml(), end="")
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from savlt.seg.cli import register as register_seg_commands
    from savlt.serve.cli import register as register_serve_commands
    from savlt.sweep.cli import register as register_sweep_commands

    parser = argparse.ArgumentParser(
        prog="savlt",
        description="Structure-aware CLIP tuning for few-shot, multi-center cervical OCT diagnosis",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic multi-center OCT data set")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=40, help="images per class and center (default 40)")
    p.add_argument(
        "--centers",
        help="comma-separated center names (default mixed,xiangya,huaxi; with --pretrain the scanners, "
        "default scanner-a,…,scanner-d)",
    )
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image height and width")
    p.add_argument(
        "--preview",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write OUT/preview.png (default on)",
    )
    p.add_argument(
        "--patients-per-class",
        type=int,
        metavar="N",
        help="the scans of each class and center come from N patients (neighbouring B-scans; metadata.csv)",
    )
    p.add_argument(
        "--volumes",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of the patients written as one multi-page TIFF volume each (needs --patients-per-class)",
    )
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="write a captioned pretraining corpus instead (OUT/pairs.csv), from scanners that are not "
        "the evaluation centers",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "pretrain", help="contrastive image-text pretraining of a CLIP backbone (loadable with --model)"
    )
    p.add_argument("pairs", type=Path, help="pairs CSV (columns file, text) or a data root (class captions)")
    p.add_argument(
        "--model", help="backbone to start from: tiny, a preset, a hub id or a folder (model.backbone)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (run again to resume)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (pretrain.max_steps)")
    p.add_argument("--adapters", choices=["none", "lora"], help="full fine-tuning (none) or LoRA adapters")
    p.add_argument("--seed", type=int, help="seed of the held-out split, batches and initialisation")
    p.add_argument("--float16", action="store_true", help="store the weights in float16 (half the file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    data = sub.add_parser("data", help="inspect a data set").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("check", help="count images per center and class, and list every problem")
    p.add_argument("root", type=Path)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p)
    p.set_defaults(func=cmd_data_check)
    fewshot = sub.add_parser("fewshot", help="few-shot draws").add_subparsers(
        dest="fewshot_command", required=True
    )
    p = fewshot.add_parser(
        "import",
        help="turn the published code's few-shot pickle (split_fewshot/shot_K-seed_S.pkl) into a few-shot "
        "JSON for data.fewshot_file; nothing in the pickle is run",
    )
    p.add_argument("file", type=Path, help="the published few-shot pickle")
    p.add_argument("--data", type=Path, help="data root holding the scans it lists (data.root)")
    p.add_argument(
        "--center", help="the training center it was drawn from (data.train_center, default mixed)"
    )
    p.add_argument(
        "--seed", type=int, help="the draw's seed to record (default: from the name shot_K-seed_S.pkl)"
    )
    p.add_argument("--out", type=Path, required=True, help="the few-shot JSON to write")
    add_config_arguments(p)
    p.set_defaults(func=cmd_fewshot_import)

    p = sub.add_parser("train", help="train SAVLT (or a baseline) on K shots and evaluate every center")
    p.add_argument("--data", type=Path, help="data root (data.root)")
    p.add_argument("--shots", type=int, help="images per class (train.shots)")
    p.add_argument("--seed", type=int, help="training seed (train.seed)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument(
        "--model",
        help="backbone: a Hugging Face CLIP id or folder, an open_clip folder, hf-hub:ORG/NAME (open_clip, "
        "e.g. BiomedCLIP), open_clip:ARCH (with --set model.weights=FILE), tiny-oct, tiny, tiny-openclip "
        "(model.backbone)",
    )
    p.add_argument("--method", choices=list(METHODS), help="the method to train (default savlt)")
    p.add_argument("--segmenter", help="tissue-segmenter checkpoint folder (roi.segmenter)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds another SAVLT run or evaluation (never anything else)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-points",
        help="train several configured runs in one process (what a sweep runs for its feature-based points)",
    )
    p.add_argument(
        "--point",
        nargs=3,
        action="append",
        required=True,
        metavar=("CONFIG", "OUT", "LOG"),
        help="a run: its configuration file, its folder and the file its output is appended to",
    )
    p.set_defaults(func=cmd_train_points)

    p = sub.add_parser("evaluate", help="re-score a saved run on the internal test split and other centers")
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, help="data root (default: the one the run was trained on)")
    p.add_argument("--centers", help="comma-separated centers (default: all of the run's)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default RUN/evaluation; an evaluation of this run is replaced)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds another SAVLT run or evaluation (never anything else)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="accuracy and AUC of finished runs side by side, per center")
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "config",
        help="print the resolved configuration, or (--list) every key with its type, default and help",
    )
    add_config_arguments(p)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--list", action="store_true", help="every configuration key, its type, default and help"
    )
    shown.add_argument("--markdown", action="store_true", help="the same list as a Markdown table")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("predict", help="diagnose scans with a saved run")
    p.add_argument("run", type=Path)
    p.add_argument("images", nargs="+", type=Path, help="image files, or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--heatmap", type=Path, metavar="DIR", help="write ROI attention heat maps to DIR")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the predictions to a CSV file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    register_seg_commands(sub)
    register_sweep_commands(sub)
    register_serve_commands(sub)
    return parser


def console_handler(level: int, rank: str) -> logging.Handler:
    """The console log: under ``accelerate launch`` (RANK set) only rank 0 reports progress; the
    other ranks print warnings and errors only, marked with their rank."""
    console = logging.StreamHandler()
    if rank in ("", "0"):
        console.setFormatter(PlainTextFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        console.setLevel(max(level, logging.WARNING))
        console.setFormatter(PlainTextFormatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    return console


def main(argv: list[str] | None = None) -> int:
    refuse_in_a_starting_worker()  # a worker importing an unguarded script: one line, before anything runs
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, handlers=[console_handler(level, os.environ.get("RANK", "0"))])
    try:
        with stop_signals():  # `kill` and a closed terminal stop a command as Ctrl-C does
            return int(args.func(args) or 0)
    except SavltError as exc:
        if args.verbose:
            raise
        print(f"savlt: error: {plain_text(str(exc))}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged: the message names the setting to lower
        if args.verbose:
            raise
        print(f"savlt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went into a pipe that closed early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 1
    except OSError as exc:  # a full disk where no writer of SAVLT's own named the file (a figure, a log)
        if exc.errno not in NO_SPACE or args.verbose:
            raise
        where = exc.filename or getattr(args, "out", None) or "an output file"
        print(f"savlt: error: {plain_text(no_space_message(where))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("savlt: interrupted\n")  # one write: a line of its own beside other processes'
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
