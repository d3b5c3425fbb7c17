"""The stock nnU-Net trainer lookup finds our classes in fresh processes with a clean environment."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def clean_env(**extra) -> dict:
    """Only what a user's new shell would have: no nnUNet_* variables at all."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")}
    env.update(extra)
    return env


def py(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def installed_trainer_folder() -> str:
    """The trainer folder of the *installed* package (a fresh interpreter, not this test process,
    which may import the source tree)."""
    proc = py("from nnunet_moe._discovery import trainer_folder; print(trainer_folder())",
              clean_env(NNUNET_MOE_NO_AUTODISCOVERY="1"))
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.strip()
    assert os.path.isfile(os.path.join(folder, "nnunet_moe_trainers.py"))
    return folder


def test_hook_sets_ext_trainer_in_fresh_interpreter():
    # The variable is set at start-up, before any import of ours, by the installed .pth hook.
    proc = py("import os; print(os.environ.get('nnUNet_extTrainer'))", clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(os.pathsep) == [installed_trainer_folder()]


def test_hook_keeps_user_entries_first_and_can_be_disabled(tmp_path):
    proc = py("import os; print(os.environ.get('nnUNet_extTrainer'))", clean_env(nnUNet_extTrainer=str(tmp_path)))
    assert proc.stdout.strip().split(os.pathsep) == [str(tmp_path), installed_trainer_folder()]
    proc = py("import os; print(os.environ.get('nnUNet_extTrainer'))", clean_env(NNUNET_MOE_NO_AUTODISCOVERY="1"))
    assert proc.stdout.strip() == "None"


def test_stock_lookup_resolves_short_schedule_class_and_it_pickles_by_package_path():
    code = """
        import pickle
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        cls = recursive_find_trainer_class_by_name('nnUNetTrainer_3epochs_7iters')
        print(cls.__module__, cls.__qualname__, cls.__mro__[1].__name__)
        import sys; sys.stdout.buffer.write(b'PICKLE:' + pickle.dumps(cls).hex().encode() + b'\\n')
    """
    proc = py(code, clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "nnunet_moe.training.short_schedule nnUNetTrainer_3epochs_7iters nnUNetTrainer" in lines
    blob = [l for l in lines if l.startswith("PICKLE:")][0][len("PICKLE:"):]
    # A new process (as when a checkpoint is loaded later) unpickles it by its nnunet_moe path.
    proc2 = py(f"""
        import pickle
        cls = pickle.loads(bytes.fromhex('{blob}'))
        print(cls.__name__, cls.__module__)
    """, clean_env())
    assert proc2.returncode == 0, proc2.stderr
    assert proc2.stdout.split() == ["nnUNetTrainer_3epochs_7iters", "nnunet_moe.training.short_schedule"]


def test_spawned_child_process_finds_trainer():
    # nnU-Net's DDP (mp.spawn) and its data-loader workers start new interpreters that only get
    # the trainer's *name*; the start-up hook must hold there too.
    code = """
        import multiprocessing as mp

        def child(q):
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
            q.put(recursive_find_trainer_class_by_name('nnUNetTrainer_2epochs').__module__)

        if __name__ == '__main__':
            ctx = mp.get_context('spawn')
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start(); print(q.get(timeout=240)); p.join()
    """
    script = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nnunet_moe_spawn_{os.getpid()}.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(code))
    try:
        proc = subprocess.run([sys.executable, script], env=clean_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.remove(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "nnunet_moe.training.short_schedule"


def test_unknown_trainer_name_lists_ours():
    # our folder is searched last, so its error (listing our trainers) is the one nnU-Net's search raises
    proc = py("""
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        try:
            recursive_find_trainer_class_by_name('nnUNetTrainerDoesNotExist')
        except RuntimeError as e:
            print('RAISED', e)
    """, clean_env())
    assert "RAISED nnunet-moe: no trainer named 'nnUNetTrainerDoesNotExist'. nnunet-moe trainers: " in proc.stdout
    assert "See `nnunet-moe list`." in proc.stdout


def test_folders_listed_after_ours_are_still_searched(tmp_path):
    # only the last folder may stop the search: a user's folder after ours must still be found
    (tmp_path / "my_trainers.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class nnUNetTrainerMine(nnUNetTrainer):\n    pass\n")
    proc = py("""
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        print('FOUND', recursive_find_trainer_class_by_name('nnUNetTrainerMine').__name__)
    """, clean_env(nnUNet_extTrainer=installed_trainer_folder() + os.pathsep + str(tmp_path)))
    assert "FOUND nnUNetTrainerMine" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_console_command_list_and_env():
    exe = os.path.join(os.path.dirname(sys.executable), "nnunet-moe")
    proc = subprocess.run([exe, "list"], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from nnunet_moe.training.catalog import trainer_names

    for name in trainer_names():
        assert name in proc.stdout
    assert "<Trainer>_<E>epochs" in proc.stdout
    proc = subprocess.run([exe, "env"], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert f'export nnUNet_extTrainer="{installed_trainer_folder()}' in proc.stdout
    assert "nothing to do" in proc.stdout  # the start-up hook is active
    assert "nnUNet_raw is not set" in proc.stdout
