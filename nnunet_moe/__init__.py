"""nnunet-moe: recent Mixture-of-Experts, Mamba and patch-selection architectures as nnU-Net v2 trainers.

Importing this package is cheap on purpose (no torch, no nnU-Net): it is imported from a
``.pth`` hook at every interpreter start to make nnU-Net find our trainers.
"""
__version__ = "0.1.0"
