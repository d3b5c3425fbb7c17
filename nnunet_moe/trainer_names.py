"""The grammar of short-schedule trainer names: ``<Trainer>_<E>epochs[_<I>iters][_bs<B>][_lr<X>]``.

One definition for the short-schedule factory (``training.short_schedule``) and for code that must
recognise such names without creating the class (the NMSW predictor's checkpoint checks). Cheap:
no torch, no nnU-Net.

``_lr<X>`` spells the initial learning rate inside a Python identifier (nnU-Net looks trainers up
by class name), in the style of nnU-Net's own ``nnUNetTrainerAdam1en3``: ``<M>[p<F>][en<K>]`` means
``M.F x 10^-K``, e.g. ``lr1en3`` = 1e-3, ``lr3en4`` = 3e-4, ``lr2p5en4`` = 2.5e-4, ``lr1`` = 1.
It must lie in (0, 1].
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

_NAME = re.compile(r"^(?P<base>\w+?)_(?P<epochs>\d+)epochs?(?:_(?P<iters>\d+)iters?)?(?:_bs(?P<bs>\d+))?"
                   r"(?:_lr(?P<lr>[^_]*))?$")  # lr: anything up to the end, so a malformed value is an error
_LR = re.compile(r"^(?P<m>\d+)(?:p(?P<f>\d+))?(?:en(?P<k>\d+))?$")
LR_RULE = ("write the learning rate as lr<M>[p<F>][en<K>] = M.F x 10^-K (e.g. lr1en3 = 1e-3, lr2p5en4 = 2.5e-4), "
           "a value in (0, 1]")


class ShortName(NamedTuple):
    base: str
    epochs: int
    iters: Optional[int]
    batch_size: Optional[int]
    lr: Optional[float]


def parse_lr(text: str, name: str = "") -> float:
    """``'1en3'`` -> 0.001, ``'2p5en4'`` -> 0.00025; ``ValueError`` naming the value and the rule otherwise."""
    where = f" in trainer name {name!r}" if name else ""
    m = _LR.match(text)
    if m is None:
        raise ValueError(f"learning rate {text!r}{where} is malformed: {LR_RULE}.")
    lr = float(f"{m.group('m')}.{m.group('f') or '0'}e-{m.group('k') or '0'}")
    if not 0.0 < lr <= 1.0:
        raise ValueError(f"learning rate {text!r} = {lr:g}{where} is out of range: {LR_RULE}.")
    return lr


def format_lr(lr: float) -> str:
    """The ``_lr`` spelling of ``lr`` (inverse of :func:`parse_lr`): 1e-3 -> ``'1en3'``, 2.5e-4 -> ``'2p5en4'``."""
    if not 0.0 < float(lr) <= 1.0:
        raise ValueError(f"learning rate {lr!r} is out of range: {LR_RULE}.")
    mantissa, exponent = f"{float(lr):.12e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".").replace(".", "p")
    k = -int(exponent)
    return mantissa + (f"en{k}" if k else "")


def parse_short_name(name: str) -> Optional[ShortName]:
    """``'X_5epochs_20iters'`` -> ``('X', 5, 20, None, None)``; ``'X_2epochs_4iters_bs2_lr1en3'`` ->
    ``('X', 2, 4, 2, 0.001)``; a name outside the grammar -> None; a bad number -> ``ValueError``."""
    m = _NAME.match(name)
    if m is None:
        return None
    epochs = int(m.group("epochs"))
    iters = int(m.group("iters")) if m.group("iters") else None
    batch = int(m.group("bs")) if m.group("bs") else None
    if epochs < 1 or (iters is not None and iters < 1) or (batch is not None and batch < 1):
        raise ValueError(f"Trainer name {name!r}: epochs, iterations and batch size must be >= 1.")
    lr = parse_lr(m.group("lr"), name) if m.group("lr") is not None else None
    return ShortName(m.group("base"), epochs, iters, batch, lr)
