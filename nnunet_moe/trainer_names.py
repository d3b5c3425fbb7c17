"""The grammar of short-schedule trainer names: ``<Trainer>_<E>epochs[_<I>iters][_bs<B>]``.

One definition for the short-schedule factory (``training.short_schedule``) and for code that must
recognise such names without creating the class (the NMSW predictor's checkpoint checks). Cheap:
no torch, no nnU-Net.
"""
from __future__ import annotations

import re

_NAME = re.compile(r"^(?P<base>\w+?)_(?P<epochs>\d+)epochs?(?:_(?P<iters>\d+)iters?)?(?:_bs(?P<bs>\d+))?$")


def parse_short_name(name: str):
    """``'X_5epochs_20iters'`` -> ``('X', 5, 20, None)``; ``'X_5epochs'`` -> ``('X', 5, None, None)``;
    ``'X_2epochs_4iters_bs2'`` -> ``('X', 2, 4, 2)``; else None."""
    m = _NAME.match(name)
    if m is None:
        return None
    epochs = int(m.group("epochs"))
    iters = int(m.group("iters")) if m.group("iters") else None
    batch = int(m.group("bs")) if m.group("bs") else None
    if epochs < 1 or (iters is not None and iters < 1) or (batch is not None and batch < 1):
        raise ValueError(f"Trainer name {name!r}: epochs, iterations and batch size must be >= 1.")
    return m.group("base"), epochs, iters, batch
