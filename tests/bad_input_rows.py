"""The bad-input matrix as data: what a user does wrong, and the part of the message they then see.

One row per mistake. ``shown`` is what the user types, exactly as README's "Errors you may see" table
shows it; ``expected`` is the exact fragment of the message. ``$FILE``, ``$IMAGES``, ``$LABELS``,
``$OUT``, ``$RAW``, ``$RESULTS`` stand for the user's paths; the test fills in its own. ``setup`` names what
``tests/test_bad_input_matrix.py`` prepares before the action; ``via`` is ``"cli"`` when the test runs
``shown`` as a command (console scripts of this environment), else the public Python API call the
test makes instead (the code that command runs, in-process: a subprocess costs seconds of imports).
``e2e`` rows need the session's tiny trained model.

``python tests/bad_input_rows.py --markdown`` prints README's table; a test keeps the two equal.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

PLACEHOLDERS = ("$RESULTS", "$IMAGES", "$LABELS", "$FILE", "$OUT", "$RAW")


@dataclass(frozen=True)
class Row:
    id: str
    shown: str
    expected: str
    setup: str
    via: str = "cli"
    e2e: bool = False


_READ = "is not a readable PyTorch checkpoint"
_CUT = (f"'$FILE' {_READ}: it starts like the zip archive torch.save writes but is incomplete or damaged")
_JUNK = f"'$FILE' {_READ} (UnpicklingError: Unsupported operand 60); expected a file written by torch.save"
_SWIN = "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerSwinSMTSmall -device cpu"
_VMAMBA = "nnUNetv2_train 501 2d 0 -tr nnUNetTrainerSwinUMamba -device cpu"
_SAM = "nnUNetv2_train 501 2d 0 -tr nnUNetTrainerMoESAM -device cpu"
_M4OE = "nnUNetv2_train 501 2d 0 -tr nnUNetTrainerM4oESmall -device cpu"
_PREDICT = "nnUNetv2_predict -i $IMAGES -o $OUT -d 501 -c 3d_fullres -f 0 -tr nnUNetTrainer_1epochs_2iters -device cpu"
_MODEL = "3D model of nnUNetTrainer_1epochs_2iters"

ROWS = (
    Row("unknown-trainer", "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerSwinSMTTiny -device cpu",
        "nnunet-moe: no trainer named 'nnUNetTrainerSwinSMTTiny'. nnunet-moe trainers: nnUNetTrainerSwinSMT, "
        "nnUNetTrainerSwinSMTSmall,", "planned"),
    Row("configuration-not-supported", "nnUNetv2_train 501 2d 0 -tr nnUNetTrainerNMSW -device cpu",
        "nnUNetTrainerNMSW supports the configurations 3d_fullres, not '2d'. Run e.g. nnUNetv2_train DATASET "
        "3d_fullres FOLD -tr nnUNetTrainerNMSW.", "planned"),
    Row("configuration-not-supported-2d-model",
        "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerMoESAMSmall -device cpu",
        "nnUNetTrainerMoESAMSmall is a 2D model (SAM's image encoder segments 2D images): configuration "
        "'3d_fullres' is not supported; run nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMoESAMSmall.",
        "planned", via="trainer"),
    Row("patch-size-not-valid",
        "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerSwinSMTSmall -p nnUNetPlansZeroPatch -device cpu",
        "nnUNetTrainerSwinSMTSmall: the 3d_fullres patch size [0, 56, 40] of plans 'nnUNetPlansZeroPatch' cannot be "
        "made valid for this architecture (patch size [0, 56, 40] has a non-positive axis; each axis is rounded to "
        "the nearest multiple of 32). Fix patch_size in that plans file", "planned+zero-patch"),
    Row("short-schedule-bad-lr",
        "nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerSwinSMTSmall_3epochs_lr1e-3 -device cpu",
        "learning rate '1e-3' in trainer name 'nnUNetTrainerSwinSMTSmall_3epochs_lr1e-3' is malformed: write the "
        "learning rate as lr<M>[p<F>][en<K>] = M.F x 10^-K (e.g. lr1en3 = 1e-3, lr2p5en4 = 2.5e-4)", "planned"),
    Row("swin-weights-truncated", f"NNUNET_MOE_SWIN_WEIGHTS=$FILE {_SWIN}",
        f"NNUNET_MOE_SWIN_WEIGHTS=$FILE: {_CUT}", "planned+truncated", via="trainer"),
    Row("swin-weights-corrupt", f"NNUNET_MOE_SWIN_WEIGHTS=$FILE {_SWIN}",
        f"NNUNET_MOE_SWIN_WEIGHTS=$FILE: {_JUNK}", "planned+corrupt", via="trainer"),
    Row("swin-weights-other-model", f"NNUNET_MOE_SWIN_WEIGHTS=$FILE {_SWIN}",
        "NNUNET_MOE_SWIN_WEIGHTS=$FILE: checkpoint '$FILE' does not fit this network: checkpoint tensor "
        "'swinViT.patch_embed.proj.weight' has shape (96, 3, 4, 4) but the network's 'swinViT.patch_embed.proj.weight' "
        "has shape (24, 1, 2, 2, 2) (a different architecture", "planned+vmamba"),
    Row("vmamba-weights-missing", _VMAMBA,
        "nnUNetTrainerSwinUMamba starts from the ImageNet-pretrained VMamba-Tiny encoder. Set "
        "NNUNET_MOE_VMAMBA_WEIGHTS=/path/to/vssmtiny checkpoint (the VMamba-Tiny release, dict key 'model'), or "
        "train from scratch with -tr nnUNetTrainerSwinUMambaScratch.", "planned", via="trainer"),
    Row("vmamba-weights-truncated", f"NNUNET_MOE_VMAMBA_WEIGHTS=$FILE {_VMAMBA}",
        f"NNUNET_MOE_VMAMBA_WEIGHTS=$FILE: {_CUT}", "planned+truncated", via="trainer"),
    Row("vmamba-weights-corrupt", f"NNUNET_MOE_VMAMBA_WEIGHTS=$FILE {_VMAMBA}",
        f"NNUNET_MOE_VMAMBA_WEIGHTS=$FILE: {_JUNK}", "planned+corrupt", via="trainer"),
    Row("vmamba-weights-other-model", f"NNUNET_MOE_VMAMBA_WEIGHTS=$FILE {_VMAMBA}",
        "NNUNET_MOE_VMAMBA_WEIGHTS=$FILE: $FILE has no VMamba encoder keys (layers.{i}.blocks.{j}.*): it is a "
        "checkpoint of another model.", "planned+swin"),
    Row("sam-weights-truncated", f"NNUNET_MOE_SAM_WEIGHTS=$FILE {_SAM}",
        f"NNUNET_MOE_SAM_WEIGHTS=$FILE: {_CUT}", "planned+truncated", via="trainer"),
    Row("sam-weights-corrupt", f"NNUNET_MOE_SAM_WEIGHTS=$FILE {_SAM}",
        f"NNUNET_MOE_SAM_WEIGHTS=$FILE: {_JUNK}", "planned+corrupt", via="trainer"),
    Row("sam-weights-vit-l", f"NNUNET_MOE_SAM_WEIGHTS=$FILE {_SAM}",
        "NNUNET_MOE_SAM_WEIGHTS=$FILE: '$FILE' is a SAM ViT-L checkpoint (image encoder embed dim 1024, 24 blocks); "
        "MoE-SAM is built on SAM ViT-B (embed dim 768, 12 blocks): use sam_vit_b_01ec64.pth", "planned+sam-vit-l"),
    Row("m4oe-mae-weights-truncated", f"NNUNET_MOE_M4OE_MAE_WEIGHTS=$FILE {_M4OE}",
        f"NNUNET_MOE_M4OE_MAE_WEIGHTS=$FILE: {_CUT}", "planned+truncated", via="trainer"),
    Row("m4oe-mae-weights-other-model", f"NNUNET_MOE_M4OE_MAE_WEIGHTS=$FILE {_M4OE}",
        "NNUNET_MOE_M4OE_MAE_WEIGHTS=$FILE: '$FILE' is a VMamba checkpoint (layers.*.blocks.*), not an M4oE MAE "
        "weights file (format marker 'nnunet_moe.m4oe_mae_encoder'). Point NNUNET_MOE_M4OE_MAE_WEIGHTS at the "
        "m4oe_mae_encoder.pth that nnUNetTrainerM4oEPretrain writes", "planned+vmamba", via="trainer"),
    Row("trust-checkpoints-bad-value", f"NNUNET_MOE_TRUST_CHECKPOINTS=yes NNUNET_MOE_SWIN_WEIGHTS=$FILE {_SWIN}",
        "NNUNET_MOE_TRUST_CHECKPOINTS='yes' is not 0 or 1: set it to 1 to load checkpoint files that hold Python "
        "objects besides tensors (only files you trust: unpickling can run code), or unset it",
        "planned+swin", via="trainer"),
    Row("swin-umamba-init-bad-value",
        "NNUNET_MOE_SWIN_UMAMBA_INIT=xavier nnUNetv2_train 501 2d 0 -tr nnUNetTrainerSwinUMambaScratch -device cpu",
        "NNUNET_MOE_SWIN_UMAMBA_INIT='xavier': the Swin-UMamba initialisation must be one of pytorch, authors",
        "planned", via="trainer"),
    Row("selective-scan-bad-value",
        "NNUNET_MOE_SELECTIVE_SCAN=fast nnUNetv2_train 501 2d 0 -tr nnUNetTrainerSwinUMambaScratch -device cpu",
        "environment variable NNUNET_MOE_SELECTIVE_SCAN='fast' is not one of ('auto', 'torch', 'mamba_ssm')", "none",
        via="selective_scan"),
    Row("selective-scan-kernel-not-installed", "NNUNET_MOE_SELECTIVE_SCAN=mamba_ssm nnUNetv2_train 501 2d 0 -tr "
        "nnUNetTrainerSwinUMambaScratch -device cuda", "environment variable NNUNET_MOE_SELECTIVE_SCAN='mamba_ssm' "
        "requests the CUDA selective-scan kernel, but mamba_ssm is not importable. Install it with "
        "`pip install nnunet-moe[cuda]`", "none", via="selective_scan"),
    Row("nmsw-k-bad-value", "NNUNET_MOE_NMSW_K=0 nnUNetv2_predict ... -tr nnUNetTrainerNMSW",
        "NNUNET_MOE_NMSW_K='0': the number of local patches K must be >= 1", "none", via="nmsw_k_from_env"),
    Row("nmsw-test-noise-bad-value", "NNUNET_MOE_NMSW_TEST_NOISE=maybe nnUNetv2_predict ... -tr nnUNetTrainerNMSW",
        "NNUNET_MOE_NMSW_TEST_NOISE='maybe' is not a switch; use 1 or 0", "none", via="test_noise_from_env"),
    Row("nmsw-tta-bad-value", "NNUNET_MOE_NMSW_TTA=2 nnUNetv2_predict ... -tr nnUNetTrainerNMSW",
        "NNUNET_MOE_NMSW_TTA='2' is not a switch; use 1 or 0", "none", via="tta_from_env"),
    Row("no-autodiscovery-bad-value", "NNUNET_MOE_NO_AUTODISCOVERY=maybe nnunet-moe env",
        "nnunet-moe env: error: NNUNET_MOE_NO_AUTODISCOVERY='maybe' is not a switch: set it to 1 to switch the "
        "automatic discovery of nnunet-moe trainers off", "none"),
    Row("nnunet-variable-missing", "env -u nnUNet_results nnunet-moe benchmark -d 501 -c 3d_fullres -f 0 "
        "-tr nnUNetTrainerSwinSMTSmall", "nnunet-moe benchmark: error: nnunet-moe benchmark needs nnU-Net's folder "
        "variables, and nnUNet_results is not set.", "planned"),
    Row("benchmark-no-trained-model", "nnunet-moe benchmark -d 501 -c 3d_fullres -f 0 -tr nnUNetTrainerSwinSMTSmall",
        "trainer nnUNetTrainerSwinSMTSmall: no results folder $RESULTS/Dataset501_Hippocampus/"
        "nnUNetTrainerSwinSMTSmall__nnUNetPlans__3d_fullres (train it with `nnUNetv2_train Dataset501_Hippocampus "
        "3d_fullres 0 -tr nnUNetTrainerSwinSMTSmall", "planned"),
    Row("demo-id-taken", "nnunet-moe demo",
        "nnunet-moe demo: error: Dataset id 501 is already used by $RAW/Dataset501_Prostate. nnunet-moe will not "
        "touch it: choose another id (e.g. `nnunet-moe demo --dataset-id 502`).", "other-dataset"),
    Row("predict-empty-folder", _PREDICT,
        "input folder $IMAGES has no images named <case>_0000.nii.gz, so there is nothing to predict",
        "model+empty", e2e=True),
    Row("predict-wrong-channel-count", _PREDICT,
        f"case hippocampus_001: 2 image file(s) ['hippocampus_001_0000.nii.gz', 'hippocampus_001_0001.nii.gz'], "
        f"but this {_MODEL} was trained on 1 channel(s) ['MRI']: give each case exactly the files "
        f"['hippocampus_001_0000.nii.gz'].", "model+two-channels", e2e=True),
    Row("predict-2d-image-3d-model", _PREDICT,
        f"$IMAGES/hippocampus_001_0000.nii.gz is a 2D image, but this {_MODEL} segments 3D volumes: predict 2D "
        f"images with a 2d model (-c 2d), or give the 3D volume.", "model+2d", e2e=True),
    Row("benchmark-other-labels", "nnunet-moe benchmark -d 502 -c 3d_fullres -f 0 -tr nnUNetTrainer_1epochs_2iters "
        "-i $IMAGES -l $LABELS", "differ from the reference labels {'background': 0, 'hippocampus': 1} "
        "($RAW/Dataset502_Relabelled/dataset.json); a Dice per label would compare different structures, so this "
        "model is skipped.", "model+relabelled", e2e=True),
)


def markdown() -> str:
    """README's table: what the user does, what they see."""
    lines = ["| what you do | what you see (part of the message) |", "|---|---|"]
    for row in ROWS:
        assert "|" not in row.shown + row.expected, row.id  # would end the table cell
        lines.append(f"| `{row.shown}` | `` {row.expected} `` |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python tests/bad_input_rows.py --markdown")
    print(markdown())
