"""One image of a source dataset, as data_prep's converters (sources.py, synthetic.py) hand it to the writer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceImage:
    """One image of a source: where it goes (split, class) and how to get its bytes: ``("file", path)``
    (read, checked and re-encoded if asked), or ``(function, *args)`` of a module-level function that
    returns the JPEG bytes of a generated image (picklable: the writer's worker processes call it)."""

    split: str
    class_name: str
    item: str  # the source's path or id, recorded in the record's json
    load: tuple
