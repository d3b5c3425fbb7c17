"""What a pretrained-weight loader did, key by key: one report shape for every loader."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """Key names are the target network's (or encoder's); ``unexpected``/``dropped`` name checkpoint keys.

    ``loaded``: copied (adapted ones included); ``upcycled``: Soft MoE expert tensors initialised from a dense
    MLP; ``adapted``: key -> how it was adapted; ``skipped``: key -> why it was not loaded; ``dropped``:
    checkpoint parts the target has no use for (e.g. a classifier head); ``missing``: target keys left at
    their initialisation; ``unexpected``: checkpoint keys without a counterpart.
    """

    checkpoint: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    upcycled: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self, max_names: int | None = 5) -> str:
        """Counts (loaded, missing and unexpected always, the other categories when not empty), then one line
        per non-empty category but loaded/upcycled naming at most ``max_names`` keys (None: all), with the
        reason for adapted and skipped ones."""
        def names(keys, reasons):
            keys = list(keys)
            shown = keys if max_names is None else keys[:max_names]
            text = ", ".join(f"{k} ({reasons[k]})" if reasons else k for k in shown)
            return f" [{text}{', ...' if len(shown) < len(keys) else ''}]"

        counts = [("tensors loaded", self.loaded, True),
                  ("expert tensors upcycled from dense MLPs", self.upcycled, False),
                  ("adapted", self.adapted, False), ("skipped", self.skipped, False), ("dropped", self.dropped, False),
                  ("missing", self.missing, True), ("unexpected", self.unexpected, True)]
        lines = [f"Loaded {os.path.basename(self.checkpoint)} ({self.layout} layout): "
                 + ", ".join(f"{len(keys)} {label}" for label, keys, always in counts if always or keys)]
        for label, keys, reasons in (("adapted", self.adapted, self.adapted), ("skipped", self.skipped, self.skipped),
                                     ("dropped (not used by this network)", self.dropped, None),
                                     ("missing (kept initialisation)", self.missing, None),
                                     ("unexpected (ignored)", self.unexpected, None)):
            if keys:
                lines.append(f"  {label}: {len(keys)}{names(keys, reasons)}")
        return "\n".join(lines)


def sort_checkpoint(state: dict, target: dict, report: LoadReport, drop=None, adapt=None) -> dict:
    """Sort checkpoint tensors into ``report``'s categories; return the ``{key: tensor}`` to load.

    Per checkpoint key, in order: ``drop(key)`` true -> ``dropped``; not in ``target`` (the network's state
    dict) -> ``unexpected``; same shape -> loaded as is; else ``adapt(key, value, target_tensor)``, the loader's
    own rules, returns ``(tensor, how)`` -> ``adapted``, ``(None, why)`` -> ``skipped`` for that reason, or
    ``None`` -> ``skipped`` as a shape mismatch. The caller loads the result and fills ``loaded``/``missing``."""
    new = {}
    for key, value in state.items():
        if drop is not None and drop(key):
            report.dropped.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        wanted = target[key]
        if value.shape == wanted.shape:
            new[key] = value
            continue
        result = adapt(key, value, wanted) if adapt is not None else None
        if result is not None and result[0] is not None:
            new[key], report.adapted[key] = result
        else:
            report.skipped[key] = result[1] if result is not None else (
                f"shape {tuple(value.shape)} in the checkpoint, {tuple(wanted.shape)} here")
    return new
