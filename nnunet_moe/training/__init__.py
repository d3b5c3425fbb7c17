"""nnU-Net trainers: build ``networks``, load ``pretrained`` weights, use ``inference`` for prediction."""
