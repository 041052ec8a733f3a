"""``savlt seg train | predict | evaluate | import``: thin wrappers over savlt.seg, registered by savlt.cli.

Flags are config values, applied after ``--config`` and before ``--set``, so the saved
config.yaml says exactly what ran.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from savlt.config import SegConfig, add_config_arguments, config_from_args

ARCHS = typing.get_args(typing.get_type_hints(SegConfig)["arch"])


def _centers(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _add_common(
    p: argparse.ArgumentParser,
    data_help: str,
    centers_help: str = "comma-separated center names (default: all)",
) -> None:
    p.add_argument("--data", type=Path, help=data_help)
    p.add_argument("--centers", help=centers_help)
    add_config_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_train(args: argparse.Namespace) -> int:
    from savlt.seg.train import train_segmenter

    flags = {
        "data.root": args.data,
        "seg.centers": _centers(args.centers),
        "seg.arch": args.arch,
        "seg.encoder": args.encoder,
        "seg.encoder_weights": args.encoder_weights,
        "seg.folds": args.folds,
        "seg.epochs": args.epochs,
        "seg.batch_size": args.batch_size,
        "seg.image_size": args.image_size,
        "seg.lr": args.lr,
        "seg.seed": args.seed,
    }
    cfg = config_from_args(args, flags)
    inputs = {"config file": args.config} if args.config else None
    summary = train_segmenter(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite, inputs=inputs)
    print(summary.table())
    print(
        f"checkpoints: {args.out}/fold0 … fold{cfg.seg.folds - 1} (best: fold{summary.best_fold}); "
        f"report: {args.out / 'report.md'}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from savlt.data.discover import scan_data
    from savlt.seg.model import load_segmenter
    from savlt.seg.predict import predict_dataset

    cfg = config_from_args(args, {"data.root": args.data})
    segmenter = load_segmenter(args.segdir)
    scan = scan_data(cfg.data.root, cfg.class_map(), _centers(args.centers))
    summary = predict_dataset(
        segmenter, scan, out=args.out, overwrite=args.overwrite, progress=not args.quiet
    )
    print(summary.describe())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from savlt.data.discover import scan_data
    from savlt.seg.evaluate import check_roi_quality_folder, evaluate_roi, write_roi_quality
    from savlt.seg.model import load_segmenter, resolve_checkpoint

    cfg = config_from_args(args, {"data.root": args.data})
    out = args.out or args.segdir or Path("roi_quality")
    check_roi_quality_folder(out, cfg.data.root)
    folder = resolve_checkpoint(args.segdir) if args.segdir else None
    segmenter = load_segmenter(folder) if folder else None
    scan = scan_data(cfg.data.root, cfg.class_map(), _centers(args.centers))
    quality = evaluate_roi(scan, segmenter, top_fraction=cfg.roi.top_fraction, progress=not args.quiet)
    print(quality.table())
    written = write_roi_quality(quality, out, folder)
    print("written: " + ", ".join(map(str, written)))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from savlt.seg.model import import_segmenter

    folder = import_segmenter(
        args.file,
        args.arch,
        args.encoder,
        args.out,
        args.image_size,
        args.threshold,
        _centers(args.trained_on),
    )
    print(f"segmenter folder: {folder} (use it with --segmenter {folder})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``seg train|predict|evaluate`` to the savlt command's subparsers."""
    seg = sub.add_parser("seg", help="train, apply and evaluate the tissue segmenter (ROI structure prior)")
    commands = seg.add_subparsers(dest="seg_command", required=True)

    p = commands.add_parser("train", help="k-fold cross-validated training on every image with a mask")
    _add_common(
        p,
        "data root (ROOT/<center>/images/<class>/…, masks under ROOT/<center>/masks/)",
        "comma-separated centers whose masks train it (default: the training center, data.train_center; "
        "others are recorded in every run that uses the segmenter)",
    )
    p.add_argument("--arch", choices=ARCHS, help="network (default unet)")
    p.add_argument("--encoder", help="segmentation_models_pytorch encoder (default resnet18)")
    p.add_argument(
        "--encoder-weights",
        help="'auto' (default: ImageNet weights when in the local Hugging Face cache, else from scratch), "
        "'imagenet' (required from the cache, never downloaded), 'none', or an encoder weights file",
    )
    p.add_argument("--folds", type=int, help="cross-validation folds (default 5)")
    p.add_argument("--epochs", type=int, help="epochs per fold (default 30)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="square network input, a multiple of 32 (default 224)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, default=Path("seg"), help="output folder (default ./seg)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out when it holds an earlier segmenter training"
    )
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("predict", help="write a predicted mask for every image, in the masks layout")
    p.add_argument(
        "segdir", type=Path, help="checkpoint folder (SEGDIR/foldK) or training folder (best fold)"
    )
    _add_common(p, "data root whose images are segmented")
    p.add_argument("--out", type=Path, help="mask root (default: the data root, beside the images)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the existing masks an earlier seg predict wrote (listed in MASKROOT/savlt-masks.json); "
        "masks drawn by hand, or changed since, are never replaced",
    )
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("evaluate", help="mask and ROI-band quality against ground-truth masks")
    p.add_argument("segdir", type=Path, nargs="?", help="segmenter checkpoint (omit: classical mask only)")
    _add_common(p, "data root with ground-truth masks")
    p.add_argument("--out", type=Path, help="report folder (default: SEGDIR, else ./roi_quality)")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser(
        "import",
        help="make a segmenter folder from a plain PyTorch state dict (e.g. the published scripts' .pth)",
    )
    p.add_argument("file", type=Path, help="the .pth file: a state dict of the network, loaded weights-only")
    p.add_argument("--arch", choices=ARCHS, required=True, help="the network it was saved from, e.g. unet")
    p.add_argument("--encoder", required=True, help="its encoder, e.g. resnet18")
    p.add_argument("--out", type=Path, required=True, help="the segmenter folder to write")
    p.add_argument("--image-size", type=int, default=224, help="square input it was trained at (default 224)")
    p.add_argument(
        "--threshold", type=float, default=0.5, help="mask threshold on the probability (default 0.5)"
    )
    p.add_argument("--trained-on", metavar="CENTERS", help="comma-separated centers whose masks trained it")
    p.set_defaults(func=cmd_import)
