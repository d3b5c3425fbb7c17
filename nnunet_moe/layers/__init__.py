"""Building blocks, one layer per module (Soft MoE, selective scan, SS2D/SS3D, VSS block, Gumbel top-K,
patch grid and aggregation). Imports only torch, MONAI and each other."""
