"""Output folders that never replace a user's files."""
from __future__ import annotations

import os


def free_folder(path: str) -> str:
    """``path`` if it does not exist yet, else ``path_2``, ``path_3``... (never reuse a user's folder)."""
    candidate, i = path, 1
    while os.path.exists(candidate):
        i += 1
        candidate = f"{path}_{i}"
    return candidate
