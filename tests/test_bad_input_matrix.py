"""The bad-input matrix: every row of ``bad_input_rows.ROWS`` done as a user does it, and its message.

Each row asserts: the action fails (non-zero exit code, or the exception the command would end with);
the row's exact message fragment appears - for our ``nnunet-moe`` command without a Python traceback,
for nnU-Net's stock commands (whose entry points print tracebacks) on the final error line; and nothing
the user had changed (hashes of their files and folders before and after; no prediction written).

Rows run as commands (``via == "cli"``) through this environment's console scripts. ``via == "trainer"``
rows run what ``nnUNetv2_train`` runs, in-process: nnU-Net's ``get_trainer_from_args`` and the trainer's
``initialize`` (the variables of the shown command set); the other ``via`` values call the named public
function under those variables. Rows that fail before nnU-Net reads training data use a planned dataset
made of the stock plans in ``tests/data`` (no planning); ``e2e`` rows share one tiny model trained once
(``nnUNetTrainer_1epochs_2iters`` on the session's planned hippocampus data).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from bad_input_rows import PLACEHOLDERS, ROWS, markdown
from conftest import nnunet_cmd, run
from trainer_fixtures import DATA

DATASET = "Dataset501_Hippocampus"
MODEL_TRAINER = "nnUNetTrainer_1epochs_2iters"
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def folders(root) -> dict:
    paths = {var: str(root / var) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    return paths


def ours(name: str) -> bool:
    """A variable the rows set: nnU-Net's (but the trainer search path) or nnunet-moe's."""
    return name.startswith(("nnUNet_", "NNUNET_MOE_")) and name != "nnUNet_extTrainer"


def clean_env(**variables) -> dict:
    """This environment without nnU-Net's folder/run variables and without any nnunet-moe variable."""
    env = {k: v for k, v in os.environ.items() if not ours(k)}
    env.update(nnUNet_compile="f", nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", **variables)
    return env


def fingerprint(paths) -> dict:
    """sha256 of every file under ``paths`` (files or folders; symbolic links followed)."""
    digests = {}
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path, followlinks=True) for f in names)
        for name in files:
            with open(name, "rb") as f:
                digests[name] = hashlib.sha256(f.read()).hexdigest()
    return digests


# ----------------------------------------------------------------------------------------- setups
def write_planned(paths: dict) -> None:
    """Dataset 501 as ``nnUNetv2_plan_and_preprocess`` leaves it, except the preprocessed cases: every row
    using it fails before nnU-Net reads them (nnU-Net's ``initialize`` only looks at the file endings)."""
    pre = os.path.join(paths["nnUNet_preprocessed"], DATASET)
    os.makedirs(os.path.join(paths["nnUNet_raw"], DATASET))
    shutil.copyfile(os.path.join(DATA, "hippocampus_dataset.json"), os.path.join(paths["nnUNet_raw"], DATASET,
                                                                                "dataset.json"))
    for identifier in ("nnUNetPlans_2d", "nnUNetPlans_3d_fullres"):
        os.makedirs(os.path.join(pre, identifier))
        open(os.path.join(pre, identifier, "hippocampus_001.b2nd"), "wb").close()
    shutil.copyfile(os.path.join(DATA, "hippocampus_nnUNetPlans.json"), os.path.join(pre, "nnUNetPlans.json"))
    shutil.copyfile(os.path.join(DATA, "hippocampus_dataset.json"), os.path.join(pre, "dataset.json"))


def write_checkpoint(kind: str, path: str) -> None:
    import torch

    if kind == "truncated":  # a download cut in half
        torch.save({"layers.0.blocks.0.ln_1.weight": torch.arange(4096.0)}, path)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "corrupt":  # an error page saved under the checkpoint's name
        with open(path, "wb") as f:
            f.write(b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n")
    elif kind == "vmamba":  # VMamba-Tiny's layout (dict key 'model')
        torch.save({"model": {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4),
                              "layers.0.blocks.0.ln_1.weight": torch.ones(96)}}, path)
    elif kind == "swin":  # MONAI's self-supervised Swin encoder layout
        torch.save({"state_dict": {"module.patch_embed.proj.weight": torch.zeros(48, 1, 2, 2, 2),
                                   "module.layers1.0.blocks.0.norm1.weight": torch.ones(48)}}, path)
    elif kind == "sam-vit-l":  # SAM ViT-L's keys and encoder width (tensors shrunk)
        state = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 1, 1),
                 "mask_decoder.mask_tokens.weight": torch.zeros(4, 1)}
        state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
        torch.save(state, path)
    else:
        raise AssertionError(kind)


def bundled_image(case: str = "hippocampus_001") -> str:
    from nnunet_moe.demo_dataset import DATA_DIR

    return os.path.join(DATA_DIR, "images", f"{case}.nii.gz")


@pytest.fixture(scope="module")
def tiny_model(nnunet_env) -> str:
    """nnU-Net's U-Net trained for 1 epoch of 2 iterations through our short-schedule trainer: its results folder."""
    env = nnunet_env["train_env"]
    run([nnunet_cmd("nnUNetv2_train"), "501", "3d_fullres", "0", "-tr", MODEL_TRAINER, "-device", "cpu"], env=env)
    return os.path.join(env["nnUNet_results"], DATASET, f"{MODEL_TRAINER}__nnUNetPlans__3d_fullres")


def prepare(row, tmp_path, request) -> tuple:
    """(placeholder values, environment, the user's paths that must not change) for ``row.setup``."""
    base, _, extra = row.setup.partition("+")
    values, watched = {}, []
    if base == "model":
        nnunet_env = request.getfixturevalue("nnunet_env")
        model = request.getfixturevalue("tiny_model")
        env = dict(nnunet_env["train_env"])
        images = str(tmp_path / "images")
        os.makedirs(images)
        values.update({"$IMAGES": images, "$OUT": str(tmp_path / "out")})
        watched += [images, model]
        if extra == "two-channels":
            for channel in ("0000", "0001"):
                shutil.copyfile(bundled_image(), os.path.join(images, f"hippocampus_001_{channel}.nii.gz"))
        elif extra == "2d":
            import SimpleITK as sitk

            volume = sitk.ReadImage(bundled_image())
            sitk.WriteImage(volume[:, :, volume.GetSize()[2] // 2], os.path.join(images, "hippocampus_001_0000.nii.gz"))
        elif extra == "relabelled":  # the trained model under a dataset whose labels are others
            paths = folders(tmp_path)
            env.update(paths)
            raw = os.path.join(paths["nnUNet_raw"], "Dataset502_Relabelled")
            os.makedirs(raw)
            with open(os.path.join(raw, "dataset.json"), "w") as f:
                json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "hippocampus": 1},
                           "numTraining": 1, "file_ending": ".nii.gz"}, f)
            results = os.path.join(paths["nnUNet_results"], "Dataset502_Relabelled")
            os.makedirs(results)
            os.symlink(model, os.path.join(results, os.path.basename(model)))
            ds = nnunet_env["dataset"]
            values.update({"$IMAGES": ds.images_ts, "$LABELS": ds.labels_ts, "$RAW": paths["nnUNet_raw"],
                           "$RESULTS": paths["nnUNet_results"]})
            watched += [ds.images_ts, ds.labels_ts, raw]
        return values, env, watched
    paths = folders(tmp_path)
    env = clean_env(**paths)
    values.update({"$RAW": paths["nnUNet_raw"], "$RESULTS": paths["nnUNet_results"]})
    if base == "planned":
        write_planned(paths)
        watched.append(os.path.join(paths["nnUNet_preprocessed"], DATASET))
    if extra == "zero-patch":  # the user's own plans with an axis of 0
        with open(os.path.join(DATA, "hippocampus_nnUNetPlans.json")) as f:
            plans = json.load(f)
        plans["plans_name"] = "nnUNetPlansZeroPatch"
        plans["configurations"]["3d_fullres"]["patch_size"] = [0, 56, 40]
        with open(os.path.join(paths["nnUNet_preprocessed"], DATASET, "nnUNetPlansZeroPatch.json"), "w") as f:
            json.dump(plans, f)
    elif extra:
        values["$FILE"] = str(tmp_path / "weights.pth")
        write_checkpoint(extra, values["$FILE"])
        watched.append(values["$FILE"])
    if base == "other-dataset":  # the user's own dataset at the demo's id
        other = os.path.join(paths["nnUNet_raw"], "Dataset501_Prostate")
        os.makedirs(os.path.join(other, "imagesTr"))
        shutil.copyfile(bundled_image(), os.path.join(other, "imagesTr", "prostate_001_0000.nii.gz"))
        with open(os.path.join(other, "dataset.json"), "w") as f:
            json.dump({"channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1}, "numTraining": 1,
                       "file_ending": ".nii.gz"}, f)
        watched.append(other)
    return values, env, watched


# ----------------------------------------------------------------------------------------- actions
def fill(text: str, values: dict) -> str:
    for name in PLACEHOLDERS:
        if name in values:
            text = text.replace(name, values[name])
    assert "$" not in text.replace("$nnUNet", ""), f"unfilled placeholder in {text!r}"
    return text


def split_command(command: str, env: dict) -> tuple:
    """(argv, environment) of a shell line ``[env -u VAR] [VAR=value ...] program args``."""
    tokens, env = shlex.split(command), dict(env)
    while tokens[0] == "env" and tokens[1] == "-u":
        env.pop(tokens[2], None)
        tokens = tokens[3:]
    while ASSIGNMENT.match(tokens[0]):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    return tokens, env


def run_cli(command: str, env: dict) -> str:
    argv, env = split_command(command, env)
    proc = subprocess.run([nnunet_cmd(argv[0]), *argv[1:]], env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{command} succeeded:\n{output[-4000:]}"
    if argv[0] == "nnunet-moe":
        assert "Traceback" not in output, output[-4000:]
        return output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""  # nnU-Net's entry points print a traceback: the error is its last line


def run_api(row, command: str, env: dict, monkeypatch) -> str:
    argv, env = split_command(command, env)
    for name in [k for k in os.environ if ours(k)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if ours(name):
            monkeypatch.setenv(name, value)
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError, ImportError)) as error:
        if row.via == "trainer":  # what nnUNetv2_train runs before the first iteration
            import torch
            from nnunetv2.run.run_training import get_trainer_from_args

            args = argv[1:4]
            trainer = get_trainer_from_args(args[0], args[1], int(args[2]), argv[argv.index("-tr") + 1],
                                            argv[argv.index("-p") + 1] if "-p" in argv else "nnUNetPlans",
                                            device=torch.device("cpu"))
            trainer.initialize()
        elif row.via == "selective_scan":
            import torch

            from nnunet_moe.layers.selective_scan import mamba_ssm_available, selective_scan

            if "mamba_ssm" in command and mamba_ssm_available():
                pytest.skip("mamba_ssm is installed here")
            u = torch.ones(1, 2, 4)
            selective_scan(u, u, -torch.ones(2, 1), torch.ones(1, 1, 4), torch.ones(1, 1, 4))
        else:
            from nnunet_moe.inference import nmsw_predictor

            getattr(nmsw_predictor, row.via)()
    return str(error.value)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.e2e] if r.e2e else []) for r in ROWS])
def test_bad_input(row, tmp_path, request, monkeypatch):
    values, env, watched = prepare(row, tmp_path, request)
    before = fingerprint(watched)
    command, expected = fill(row.shown, values), fill(row.expected, values)
    if row.via == "cli":
        message = run_cli(command, env)
    else:
        message = run_api(row, command, env, monkeypatch)
    assert expected in message, f"{row.id}: expected\n  {expected}\nin\n  {message[-4000:]}"
    assert fingerprint(watched) == before, f"{row.id} changed the user's files"
    if "$OUT" in values:
        out = values["$OUT"]
        assert not os.path.exists(out) or not os.listdir(out), f"{row.id} wrote {os.listdir(out)}"


def test_readme_table_is_generated_from_the_rows():
    with open(README) as f:
        text = f.read()
    section = text.split("\n## Errors you may see\n", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == markdown(), "README's table differs from `python tests/bad_input_rows.py --markdown`"


def test_predictor_checks_only_models_of_our_trainers(tmp_path, monkeypatch):
    """The predict rows' mechanism in-process: loading a model of ours makes that predictor check its input
    before writing anything; loading one of nnU-Net's own trainers leaves the predictor nnU-Net's."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from test_benchmark_command import dataset_json, tiny_plans, write_model  # a hand-made trained model

    for var, path in folders(tmp_path).items():
        monkeypatch.setenv(var, path)
    empty, out = tmp_path / "empty", str(tmp_path / "out")
    empty.mkdir()
    kinds = {}
    for trainer in (MODEL_TRAINER, "nnUNetTrainer"):
        folder = write_model(os.environ["nnUNet_results"], trainer, tiny_plans(), dataset_json())
        checkpoint = os.path.join(folder, "fold_0", "checkpoint_final.pth")
        saved = torch.load(checkpoint, weights_only=False)
        torch.save({**saved, "trainer_name": trainer}, checkpoint)
        predictor = nnUNetPredictor(device=torch.device("cpu"))
        predictor.initialize_from_trained_model_folder(folder, (0,))
        kinds[trainer] = type(predictor)
        if trainer == MODEL_TRAINER:
            with pytest.raises(ValueError, match=f"input folder {empty} has no images named <case>_0000.nii.gz"):
                predictor.predict_from_files(str(empty), out)
            assert not os.path.exists(out)
    assert kinds[MODEL_TRAINER].__name__ == "InputCheckingPredictor"
    assert kinds["nnUNetTrainer"] is nnUNetPredictor  # nnU-Net's own behaviour for its own trainers
