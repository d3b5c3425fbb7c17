"""nnU-Net's external trainer folder for nnunet-moe (see nnunet_moe/_discovery.py).

nnU-Net 2.8 imports every module in this folder as a top-level module while it searches
for ``-tr NAME``. The modules here only re-export classes that live in ``nnunet_moe``, so
the classes keep their package path and checkpoints/pickles stay importable.
"""
