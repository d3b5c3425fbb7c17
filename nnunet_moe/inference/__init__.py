"""Inference beyond nnU-Net's sliding window (NMSW) and input checks for nnU-Net's predictor; imports ``networks`` and ``trainer_names``,
never ``training``."""
