"""The ``merge-datasets`` subcommand: parses its arguments and calls ``merge.merge_datasets``."""
from __future__ import annotations

import argparse


def cmd_merge_datasets(args) -> int:
    from nnunet_moe.datasets.merge import merge_datasets

    merge_datasets(args.out, args.source, args.alias, args.name)
    return 0


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``merge-datasets`` to the ``nnunet-moe`` parser's subparsers."""
    parser = subparsers.add_parser(
        "merge-datasets", help="several nnU-Net raw datasets (CT/MR) as one, for one model over all (M4oE)",
        description="Merge nnU-Net raw datasets of $nnUNet_raw into a new one: case ids prefixed by source "
                    "(d502_<case>), labels relabelled into a union matched by name, images pre-normalised per "
                    "source (channel 'noNorm'), per-case source/modality/labels recorded in dataset.json, "
                    "5 folds stratified by source in splits_final.json. The sources are only read.",
        epilog="Example: nnunet-moe merge-datasets --out 601 --source 502:CT --source 503:MR --alias Spleen=spleen; "
               "then nnUNetv2_plan_and_preprocess -d 601")
    parser.add_argument("--out", type=int, required=True, help="id of the new dataset (must be unused)")
    parser.add_argument("--source", action="append", required=True, metavar="DATASET:MODALITY",
                        help="a source dataset (id or folder name in $nnUNet_raw) and its modality, CT or MR; "
                             "give at least two, in the order the union labels are numbered")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME=UNION_NAME",
                        help="rename a source label before matching by name (case-sensitive), e.g. spleen=Spleen")
    parser.add_argument("--name", default="Merged", help="dataset name after the id (default: %(default)s)")
    parser.set_defaults(func=cmd_merge_datasets)
    return parser
