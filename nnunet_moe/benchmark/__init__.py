"""``nnunet-moe benchmark`` and the layer benchmarks; imports ``inference``, ``networks`` and ``layers``,
finds trainers through nnU-Net's own trainer search."""
