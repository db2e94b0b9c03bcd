"""Matching a dataset's class names to a classifier's.

Names are compared after folding case and dropping spaces, hyphens and
underscores ("dining table" = "diningtable" = "Dining_Table"). Beyond that,
ALIASES lists the names that differ between the benchmarks and the bundled
label sets: COCO's own names (the bundled coco2014 set uses them) against the
VOC-style names of TaI-DPT's COCO lists, and NUS-WIDE's plural concepts.
"""

from __future__ import annotations

import re

# Each group names one class; any two names in a group match.
ALIASES: tuple[tuple[str, ...], ...] = (
    ("airplane", "aeroplane", "plane"),
    ("motorcycle", "motorbike"),
    ("couch", "sofa"),
    ("tv", "tvmonitor", "television"),
    ("hair drier", "hair dryer"),
    ("cell phone", "mobile phone"),
    ("bird", "birds"),
    ("boat", "boats"),
    ("car", "cars"),
    ("horse", "horses"),
)


def fold(name: str) -> str:
    """The form names are compared in: lower case, no spaces, hyphens or underscores."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


_GROUP_OF = {fold(name): group[0] for group in ALIASES for name in group}


def match_classes(wanted: list[str], available: list[str]) -> dict[str, str]:
    """{name in `wanted`: its name in `available`} for every name that has a match.

    A name equal after folding wins over an alias, so a classifier holding both
    "car" and "cars" gives each its own.
    """
    exact = {fold(name): name for name in available}
    by_group: dict[str, str] = {}
    for name in available:
        by_group.setdefault(_key(name), name)

    matches = {}
    for name in wanted:
        found = exact.get(fold(name)) or by_group.get(_key(name))
        if found is not None:
            matches[name] = found
    return matches


def _key(name: str) -> str:
    folded = fold(name)
    return _GROUP_OF.get(folded, folded)
