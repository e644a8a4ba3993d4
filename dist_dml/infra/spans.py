"""A span of training written in the data's own units: "500" or "500 steps", "2 epochs", "10%" of the run
(dist_dml.config.schedule resolves it to steps at a world size). Parsing only: any section checks its spans."""
from __future__ import annotations

import re

_SPAN = re.compile(r"^\s*(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>steps?|epochs?|ep|%)?\s*$")


def parse_span(text: str, key: str) -> tuple[float, str] | None:
    """(value, unit: steps, epochs or run) of a span, None for ""; a ValueError naming ``key`` otherwise."""
    text = str(text)
    if text.strip() == "":
        return None
    match = _SPAN.match(text)
    if not match:
        raise ValueError(f"{key}={text!r}: give steps (500), epochs ('2 epochs') or a share of the run ('10%')")
    value, unit = float(match["value"]), match["unit"] or "steps"
    unit = "run" if unit == "%" else "epochs" if unit.startswith("ep") else "steps"
    if unit == "steps" and value != int(value):
        raise ValueError(f"{key}={text!r}: a number of steps is whole")
    if unit == "run" and value > 100:
        raise ValueError(f"{key}={text!r}: a share of the run is at most 100%")
    return (value / 100 if unit == "run" else value), unit


