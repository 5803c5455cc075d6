"""`xaiserve evaluate explanations ...`: the explanation metrics table and example grid.

    xaiserve evaluate explanations --dataset scenes|lesions [--n 200] [--out DIR] [--relax-masks 3000]
    xaiserve evaluate explanations --model NAME --images DIR [--masks DIR] [--store DIR]   (your model, your data)

Writes DIR/explanations_<dataset>.md (table), .json (means, std, standard errors, settings) and
.png (examples: image, ground truth, one column per method), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xaiserve.errors import InvalidArgument, XaiError

TARGETS = ("explanations", "nem")  # service/cli.py routes both here; "nem" is an alias


def _parser() -> argparse.ArgumentParser:
    from xaiserve.training.evaluate_explanations import DEFAULT_MASK_MODELS

    p = argparse.ArgumentParser(
        prog="xaiserve evaluate explanations", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=sorted(DEFAULT_MASK_MODELS),
        help="a synthetic dataset with pixel-exact ground truth (or --model NAME --images DIR)",
    )
    p.add_argument("--model", default="", help="with --images: the frozen model, or one masking network of it")
    p.add_argument("--images", type=Path, default=None, help="a folder of your images (class subfolders = labels)")
    p.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="with --images: ground-truth masks (same relative paths): "
        "adds the localisation columns; without, deletion/insertion faithfulness",
    )
    p.add_argument(
        "--deletion-steps", type=int, default=16, help="with --images: steps of the deletion/insertion curves"
    )
    p.add_argument(
        "--backgrounds",
        default="legacy",
        choices=("legacy", "families"),
        help="scenes: the original background (legacy) or the background families scenes-nemu trains on",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "heldout"),
        help="scenes: test, or heldout (test items on the held-out background families); "
        "writes explanations_scenes[_families|_heldout].*",
    )
    p.add_argument("--n", type=int, default=200, help="test images (the first n of the held-out split)")
    p.add_argument("--out", type=Path, default=Path("eval_out"), help="output directory")
    p.add_argument("--store", type=Path, default=None, help="model store (default: the repository's model_store/)")
    p.add_argument(
        "--mask-models",
        default=None,
        help="comma-separated masking networks (default: scenes-nemu | lesions-nemt,lesions-nemt-cond; '' = none)",
    )
    p.add_argument("--frozen", default="", help="frozen model (default: the one the mask models explain)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated gradient baselines (default: all for the model kind; '' = none)",
    )
    p.add_argument("--relax-masks", type=int, default=500, help="RELAX masks per image (paper: 3000)")
    p.add_argument("--relax-paper", action="store_true", help="use the paper's N = 3000 masks per image")
    p.add_argument("--relax-batch", type=int, default=100, help="RELAX masks per forward batch")
    p.add_argument("--no-relax", action="store_true", help="leave out RELAX and U-RELAX")
    p.add_argument("--no-random", action="store_true", help="leave out the random reference row")
    p.add_argument("--no-monotonicity", action="store_true", help="skip monotonicity (classifiers; the slowest metric)")
    p.add_argument("--monotonicity-patch", type=int, default=8)
    p.add_argument("--monotonicity-samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (same for every method)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (must match the one the models were trained on)")
    p.add_argument("--data-root", type=Path, default=None, help="Fashion-MNIST IDX directory (scenes)")
    p.add_argument("--examples", type=int, default=6, help="rows in the PNG grid")
    p.add_argument("--quiet", action="store_true")
    return p


def _names(v: str | None) -> tuple[str, ...] | None:
    if v is None:
        return None
    return tuple(s.strip() for s in v.split(",") if s.strip())


def evaluate_main(target: str, argv: list[str]) -> int:
    if target not in TARGETS:
        print(f"xaiserve evaluate: unknown target {target!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    from xaiserve.training import metrics as M
    from xaiserve.training.evaluate_explanations import EvalConfig, evaluate, markdown_table, write_report

    try:
        from xaiserve.handlers.saliency import methods_for

        methods = _names(args.methods)
        if methods is not None:
            known = set(methods_for("encoder")) | set(methods_for("classifier"))
            bad = [m for m in methods if m not in known]
            if bad:
                raise InvalidArgument(f"unknown method(s) {', '.join(bad)}; available: {', '.join(sorted(known))}")
        kw = {}
        if args.store is not None:
            kw["store"] = args.store
        if (args.dataset is None) == (args.images is None):
            raise InvalidArgument("give --dataset scenes|lesions, or --model NAME --images DIR (your own data)")
        if args.images is not None:
            from xaiserve.training.evaluate_explanations import FOLDER

            kw.update(images=args.images, masks=args.masks, model=args.model, deletion_steps=args.deletion_steps)
        cfg = EvalConfig(
            dataset=args.dataset or FOLDER,
            out=args.out,
            n=args.n,
            mask_models=_names(args.mask_models),
            frozen=args.frozen,
            methods=methods,
            relax=not args.no_relax,
            relax_masks=3000 if args.relax_paper else args.relax_masks,
            relax_batch=args.relax_batch,
            random_row=not args.no_random,
            monotonicity=not args.no_monotonicity,
            monotonicity_config=M.MonotonicityConfig(
                patch=args.monotonicity_patch, n_samples=args.monotonicity_samples
            ),
            threads=args.threads,
            seed=args.seed,
            data_root=args.data_root,
            examples=args.examples,
            quiet=args.quiet,
            backgrounds=args.backgrounds,
            split=args.split,
            **kw,
        )
        result = evaluate(cfg)
        paths = write_report(result, args.out, cfg.examples)
    except XaiError as e:
        print(f"xaiserve evaluate explanations: {e.code}: {e}", file=sys.stderr)
        return 2 if isinstance(e, InvalidArgument) else 1
    print(markdown_table(result))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(
            f"usage: python -m xaiserve.training.cli_eval TARGET [options]; targets: {', '.join(TARGETS)}",
            file=sys.stderr,
        )
        return 2
    return evaluate_main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
