"""`readMask` (a google.protobuf.FieldMask in its JSON form: field paths separated by
commas, `a.b` for a nested field, camelCase or snake_case): the answer keeps only those
fields. Empty or `*` is the whole resource. A path naming no field of the resource is a
400, not an empty answer, so that a typo shows."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel

from raybatch.exceptions import InvalidArgument


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


def mask_paths(mask: Optional[str], model: type[BaseModel]) -> Optional[list[list[str]]]:
    """The mask's paths (camelCase segments), checked against `model`'s JSON fields; None
    for the whole resource."""
    if mask is None or mask.strip() in ("", "*"):
        return None
    known = {field.alias or name for name, field in model.model_fields.items()}
    paths = []
    for path in mask.split(","):
        segments = [_camel(segment.strip()) for segment in path.strip().split(".")]
        if not all(segments) or segments[0] not in known:
            raise InvalidArgument(f"readMask {mask!r}: {path.strip()!r} is not a field; fields: {', '.join(sorted(known))}")
        paths.append(segments)
    return paths


def apply_mask(body: dict, paths: Optional[list[list[str]]]) -> dict:
    """`body` with only the fields at `paths` (all of it for None)."""
    if paths is None:
        return body
    kept: dict = {}
    for segments in paths:
        source, target = body, kept
        for depth, segment in enumerate(segments):
            if not isinstance(source, dict) or segment not in source:
                break
            if depth == len(segments) - 1:
                target[segment] = source[segment]
            else:
                source = source[segment]
                target = target.setdefault(segment, {})
    return kept
