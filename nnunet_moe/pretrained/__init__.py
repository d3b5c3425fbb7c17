"""Checkpoint loaders with a shared ``LoadReport``; they import ``networks`` to know the target layout."""
