"""Inference beyond nnU-Net's sliding window (NMSW); imports ``networks``, never ``training``."""
