"""The ``nnunet-moe`` command: ``list``, ``env``, ``demo``, ``benchmark``, ``merge-datasets``."""
from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig


def cmd_list(args) -> int:
    from nnunet_moe.training.catalog import trainer_classes

    rows = [(cls.__name__, ", ".join(cls.supported_configurations), cls.paper) for cls in trainer_classes()]
    if not rows:
        print("No nnunet-moe trainers are installed in this version.")
    else:
        w0 = max(len(r[0]) for r in rows + [("trainer", "", "")])
        w1 = max(len(r[1]) for r in rows + [("", "configurations", "")])
        print(f"{'trainer':<{w0}}  {'configurations':<{w1}}  paper")
        for name, cfgs, paper in rows:
            print(f"{name:<{w0}}  {cfgs:<{w1}}  {paper}")
    print("\nShort schedules for any trainer (ours or nnU-Net's): <Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>], "
          "e.g. -tr nnUNetTrainer_2epochs_10iters or nnUNetTrainerSwinSMTSmall_3epochs_30iters_lr1en3 "
          "(lr1en3 = 1e-3, lr2p5en4 = 2.5e-4)")
    return 0


def hook_files() -> list:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(f for p in paths for f in glob.glob(os.path.join(p, "nnunet_moe_discovery.pth")))


def cmd_env(args) -> int:
    from nnunet_moe._discovery import autodiscovery_disabled, trainer_folder

    autodiscovery_disabled()  # a bad value stops here, naming it
    folder = trainer_folder()
    active = folder in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)
    hooks = hook_files()
    print("# nnU-Net finds nnunet-moe trainers through nnUNet_extTrainer (nnU-Net >= 2.8).")
    if active and hooks:
        print(f"# Set automatically at every Python start by {hooks[0]}; nothing to do.")
    else:
        print("# The automatic start-up hook is not active here; add this line to your shell profile:")
    print(f'export nnUNet_extTrainer="{folder}${{nnUNet_extTrainer:+:$nnUNet_extTrainer}}"')
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        print(f"# {var}={value}" if value else f"# {var} is not set (export {var}=/path/to/{var})")
    return 0


def cmd_demo(args) -> int:
    from nnunet_moe.demo import run_demo

    run_demo(work_dir=args.work_dir, dataset_id=args.dataset_id, dataset_name=args.dataset_name,
             trainer=args.trainer, configuration=args.configuration, fold=args.fold, device=args.device,
             num_test=args.num_test, tta=args.tta)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nnunet_moe import __version__
    from nnunet_moe.demo import DEFAULT_TRAINER
    from nnunet_moe.demo_dataset import DEFAULT_CONFIGURATION, DEFAULT_DATASET_ID, DEFAULT_DATASET_NAME

    parser = argparse.ArgumentParser(prog="nnunet-moe", description="nnU-Net v2 trainers for MoE, Mamba and "
                                     "learned patch selection architectures.")
    parser.add_argument("--version", action="version", version=f"nnunet-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="our trainers, their papers and configurations").set_defaults(func=cmd_list)
    sub.add_parser("env", help="how nnU-Net finds our trainers; the line to set it by hand").set_defaults(func=cmd_env)
    demo = sub.add_parser("demo", help="plan, train, predict and evaluate on the bundled real MRI data")
    demo.add_argument("--work-dir", default="nnunet_moe_demo",
                      help="where nnUNet_raw/_preprocessed/_results go when they are unset (default: %(default)s)")
    demo.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID, help="nnU-Net dataset id (default: %(default)s)")
    demo.add_argument("--dataset-name", default=DEFAULT_DATASET_NAME, help="dataset folder name (default: %(default)s)")
    demo.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER, help="trainer (default: %(default)s)")
    demo.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION, help="(default: %(default)s)")
    demo.add_argument("-f", "--fold", type=int, default=0, help="(default: %(default)s)")
    demo.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda", "mps"])
    demo.add_argument("--num-test", type=int, default=10, help="held-out cases (default: %(default)s)")
    demo.add_argument("--tta", action="store_true",
                      help="predict the held-out cases with nnU-Net's test-time mirroring (8 passes per patch in 3D: "
                           "about 8x the prediction time on a CPU; off by default, nnUNetv2_predict --disable_tta)")
    demo.set_defaults(func=cmd_demo)
    from nnunet_moe.benchmark.command import add_benchmark_parser

    add_benchmark_parser(sub)
    from nnunet_moe.datasets.command import add_merge_parser

    add_merge_parser(sub)
    from nnunet_moe.inference.merged_prediction import add_predict_merged_parser

    add_predict_merged_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"nnunet-moe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
