"""The union label set of a merge, matched by label name.

Rules (documented in the README):

- A source label keeps its name unless ``--alias name=union_name`` renames it (the alias applies to
  every source that has ``name``). Names are matched case-sensitively.
- The union keeps ``background`` = 0. The other union values are given in order of first appearance:
  sources in the order of ``--source``, each source's labels by ascending value; a name seen before
  keeps its value. So the first source keeps its own values when they are 1..n.
- The same union name may have different values in different sources (they are relabelled). Refused:
  one source value under two union names (a value clash; an alias can say they are one structure),
  and two different values of one source under one union name (one name with two meanings: the merge
  would silently fuse two classes).
"""
from __future__ import annotations

import numpy as np


def union_labels(sources, aliases: dict) -> tuple:
    """``(union {name: value} with background 0, {source.key: {source value: union value}},
    {source.key: {source name: union name}})``. ``sources`` need ``.key``, ``.label`` and ``.labels``."""
    known = {name for s in sources for name in s.labels}
    unused = sorted(set(aliases) - known)
    if unused:
        raise ValueError(f"--alias {unused[0]}={aliases[unused[0]]}: no source has a label named '{unused[0]}' "
                         f"(names are case-sensitive). The sources' label names are: {', '.join(sorted(known))}.")
    union = {"background": 0}
    value_maps, name_maps = {}, {}
    for s in sources:
        names_of_value, value_of_name = {}, {}
        for name, value in sorted(s.labels.items(), key=lambda kv: kv[1]):
            uname = aliases.get(name, name)
            names_of_value.setdefault(value, []).append((name, uname))
            if uname in value_of_name and value_of_name[uname][1] != value:
                other, other_value = value_of_name[uname]
                raise ValueError(
                    f"{s.label}: its labels '{other}' ({other_value}) and '{name}' ({value}) would both become the "
                    f"union label '{uname}' (one name with two meanings). merge-datasets never fuses two classes of "
                    f"one source: drop the --alias that maps them together, or relabel the source yourself.")
            value_of_name[uname] = (name, value)
        for value, pairs in names_of_value.items():
            if len({u for _, u in pairs}) > 1:
                (a, _), (b, _) = pairs[:2]
                raise ValueError(
                    f"{s.label}: label value {value} has two names, '{a}' and '{b}' (a value clash). If they are the "
                    f"same structure add --alias {b}={a}; otherwise fix the source's dataset.json.")
        for uname, (_, value) in sorted(value_of_name.items(), key=lambda kv: kv[1][1]):
            if uname not in union:
                union[uname] = len(union)
        value_maps[s.key] = {0: 0, **{value: union[uname] for uname, (_, value) in value_of_name.items()}}
        name_maps[s.key] = {name: aliases.get(name, name) for name in s.labels}
    return union, value_maps, name_maps


def case_only_differences(union: dict) -> list:
    """Pairs of union names that differ only in case (probably one structure: the user may want --alias)."""
    by_fold = {}
    for name in union:
        by_fold.setdefault(name.casefold(), []).append(name)
    return [tuple(v) for v in by_fold.values() if len(v) > 1]


def relabel(seg: np.ndarray, value_map: dict, where: str) -> np.ndarray:
    """``seg`` with every source value replaced by its union value; a ValueError names a value not in the map."""
    values = np.unique(seg)
    unknown = [v for v in values.tolist() if v not in value_map]
    if unknown:
        raise ValueError(f"{where} contains label value {unknown[0]:g}, which its dataset.json does not list "
                         f"(it lists {sorted(value_map)}); fix the label file or add the label to dataset.json.")
    lut = np.zeros(int(max(value_map)) + 1, dtype=np.int16)
    for src, dst in value_map.items():
        lut[int(src)] = dst
    return lut[seg.astype(np.int64)]
