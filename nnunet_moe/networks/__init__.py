"""One module per paper's model, composed from ``layers`` (and MONAI / dynamic-network-architectures)."""
