"""Building blocks, one layer per module (Soft MoE, selective scan, SS2D/SS3D, VSS block, Gumbel top-K,
patch grid and aggregation, MoE-SAM adapters, expert-choice routing, feature enhancement, prompt generator, M4oE).
Imports only torch, MONAI, segment-anything and each other."""
