"""Build script: metadata and dependencies live in setup.cfg.

Two things setup.cfg cannot express:

* the repository's ``trainers/`` folder (the thin modules handed to nnU-Net's
  ``nnUNet_extTrainer`` search) is installed as ``nnunet_moe/trainers``;
* ``nnunet_moe_discovery.pth`` is installed next to the packages in site-packages. Python
  runs its one import line at every interpreter start (including processes nnU-Net
  spawns), which appends our trainer folder to ``nnUNet_extTrainer``. That is what makes
  ``nnUNetv2_train ... -tr nnUNetTrainerSwinSMT`` work with zero manual steps.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnunet_moe_discovery.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        target = self.build_lib
        if getattr(self, "editable_mode", False):
            # PEP 660 editable wheels are assembled from the directory that the
            # (re-initialised) install command points at, not from build_lib.
            target = self.distribution.get_command_obj("install").install_lib or target
        self.copy_file(os.path.join(HERE, "nnunet_moe", PTH_NAME), os.path.join(target, PTH_NAME))


setup(
    packages=find_packages(include=["nnunet_moe", "nnunet_moe.*"]) + ["nnunet_moe.trainers"],
    package_dir={"nnunet_moe.trainers": "trainers"},
    cmdclass={"build_py": BuildPyWithPth},
)
