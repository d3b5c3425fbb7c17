"""training of nnunet-moe (imports go downward only: training -> networks -> layers)."""
