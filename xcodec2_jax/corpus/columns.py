"""The metadata columns a job carries from its sources into its output, beside the codes.

The columns and their types are fixed once, from every listed item, before any shard is written: all
shards get one schema (``datasets`` refuses shards whose schemas differ) and ``job.json`` records it,
so a rerun that would change it is refused. Numbers, booleans and strings keep their type (a column
mixing them becomes strings); lists and objects are written as JSON strings. Tar shards are not
read before the job, so their columns are planned from the first sample of the first shard; a later
value that its column's type cannot hold is written as null, with a warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

RESERVED = ("id", "codes", "num_codes", "duration", "num_samples")


def plan(metas: Sequence[dict | None], columns: Sequence[str] | None) -> dict[str, str]:
    """``{name: arrow type}`` of the columns to write: ``columns`` (in that order; each must occur in
    some item) or, when None, every field any item has (in order of first appearance) except the
    reserved names (``RESERVED``). ValueError for a requested column that is reserved or absent."""
    present: dict[str, None] = {}
    for meta in metas:
        for name in meta or ():
            present.setdefault(name, None)
    if columns is None:
        names = [n for n in present if n not in RESERVED]
    else:
        names = list(dict.fromkeys(columns))
        for name in names:
            if name in RESERVED:
                raise ValueError(f"column {name!r} is one the output writes itself ({', '.join(RESERVED)})")
            if name not in present:
                known = ", ".join(present) or "none"
                raise ValueError(f"no item has a field {name!r} (the sources' fields: {known})")
    return {name: _column_type([(meta or {}).get(name) for meta in metas]) for name in names}


def _column_type(values: list) -> str:
    import pyarrow as pa

    try:
        kind = pa.array([_cell(v) for v in values]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return "string"
    try:
        pa.type_for_alias(str(kind))
    except ValueError:  # dates, decimals ...: kept as their text
        return "string"
    return "string" if pa.types.is_null(kind) else str(kind)


def _cell(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def arrays(metas: Sequence[dict | None], types: dict[str, str]) -> dict:
    """``{name: pyarrow array}`` of the planned columns for rows with these ``metas``."""
    import pyarrow as pa

    out = {}
    for name, kind in types.items():
        values = [_cell((meta or {}).get(name)) for meta in metas]
        if kind == "string":
            values = [v if v is None or isinstance(v, str) else _as_text(v) for v in values]
        try:
            out[name] = pa.array(values, pa.type_for_alias(kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            out[name] = pa.array([_fitting(v, kind, name) for v in values], pa.type_for_alias(kind))
    return out


def _fitting(value, kind: str, name: str):
    """``value`` if a ``kind`` column holds it, else None with a warning: a tar shard's later samples
    can disagree with the first one, which the column's type was planned from."""
    import pyarrow as pa

    try:
        pa.array([value], pa.type_for_alias(kind))
        return value
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        warnings.warn(f"column {name!r} ({kind}): {value!r} does not fit; written as null", stacklevel=2)
        return None


def _as_text(value) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def schema_fields(types: dict[str, str]) -> list:
    """The planned columns as ``(name, pyarrow type)`` pairs of a schema."""
    import pyarrow as pa

    return [(name, pa.type_for_alias(kind)) for name, kind in types.items()]
