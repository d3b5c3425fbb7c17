"""Inference beyond nnU-Net's sliding window (NMSW); imports ``networks`` and ``pretrained.checkpoint_io``,
never ``training``."""
