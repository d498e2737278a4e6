"""The output folder: a fixed plan of shards, each written whole or not at all, and the manifest.

Items are cut, in listing order, into shards of ``shard_size`` (a tar shard of the sources is one
output shard, whatever its size); shard k goes to process ``k % num_processes``. The assignment
depends only on the listing (tar shards by name, unread) and the shard size, so a rerun
(with any number of processes) redoes exactly the shards that are missing. Shard k's rows go to
``data/train-KKKKK-of-NNNNN.parquet`` and its failed items to ``.errors/train-KKKKK-of-NNNNN.jsonl``,
each written whole (locally under a temporary name renamed into place; on an object store as one
upload), the errors file last: it is the mark of a complete shard. (A shard whose items all failed
has no Parquet file: datasets cannot read an empty one.)

``job.json``, written when the folder is first used, pins the model, config, compute settings, shard
size, metadata columns and the digest of the item ids: a rerun that would mix different codes or
shift the shards is refused. ``manifest.json`` and ``errors.jsonl`` are rebuilt from the shards by
process 0 at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np

from ..utils.storage import Location
from . import columns

DATA_DIR = "data"
ERRORS_DIR = ".errors"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"


def schema(types: dict[str, str] | None = None):
    """The output's Arrow schema: id and codes, then the carried metadata columns ``types``."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("codes", pa.list_(pa.int32())),
            ("num_codes", pa.int32()),
            ("duration", pa.float64()),
            ("num_samples", pa.int64()),
            *columns.schema_fields(types or {}),
        ]
    )


def cut(units: Sequence, shard_size: int, whole: Callable[[object], bool]) -> list:
    """The shards' contents: runs of consecutive units cut into lists of at most ``shard_size`` unit
    indices, except that a unit for which ``whole(unit)`` holds (a tar shard) is a shard by itself."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    shards: list = []
    run: list[int] = []
    for i, unit in enumerate(units):
        if whole(unit):
            shards += [run[s : s + shard_size] for s in range(0, len(run), shard_size)] + [unit]
            run = []
        else:
            run.append(i)
    return shards + [run[s : s + shard_size] for s in range(0, len(run), shard_size)]


class Plan:
    """Shards of a job under ``out``: ``shards[k]`` is shard k's list of unit indices, or the one
    unit (a tar shard) it holds whole."""

    def __init__(self, out: Location, shards: list):
        self.out = out
        self.shards = shards

    def name(self, k: int) -> str:
        return f"train-{k:05d}-of-{len(self.shards):05d}"

    def parquet(self, k: int) -> Location:
        return self.out.child(DATA_DIR, self.name(k) + ".parquet")

    def errors(self, k: int) -> Location:
        return self.out.child(ERRORS_DIR, self.name(k) + ".jsonl")

    def complete(self) -> list[int]:
        """The complete shards (one listing of the errors folder, not a request per shard)."""
        names = set(self.out.child(ERRORS_DIR).names())
        return [k for k in range(len(self.shards)) if self.name(k) + ".jsonl" in names]

    def written(self) -> set[int]:
        """The shards with a Parquet file (complete or not)."""
        names = set(self.out.child(DATA_DIR).names())
        return {k for k in range(len(self.shards)) if self.name(k) + ".parquet" in names}

    def mine(self, process_id: int, num_processes: int) -> list[int]:
        """This process's shards that are not complete yet."""
        done = set(self.complete())
        return [k for k in range(process_id, len(self.shards), num_processes) if k not in done]


def ids_digest(ids: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for i in ids:
        digest.update(i.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def check_job(out: Location, job: dict, create: bool) -> None:
    """Refuse an OUT made by another job (model, config, settings, items); write ``job.json`` if new."""
    path = out.child(JOB_FILE)
    if path.is_file():
        old = json.loads(path.read_bytes())
        changed = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
        if changed:
            details = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(job.get(k))} now" for k in changed)
            raise ValueError(
                f"{out} holds the output of a different job ({details}); codes of different jobs are "
                "never mixed: use a new output folder, or delete this one to start over"
            )
        return
    if not create:
        return
    if out.child(DATA_DIR).names():
        raise ValueError(
            f"{out}/{DATA_DIR} holds files but {out} has no {JOB_FILE}: not an output folder of ours"
        )
    path.write_bytes(_json(job))


def _json(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def write_shard(plan: Plan, k: int, rows: list[dict], errors: list[dict], types: dict[str, str]) -> None:
    """Shard k's rows (in item order, each with its ``meta``) and failed items. The errors file is
    written last and marks the shard complete: on an object store, where nothing is renamed, each
    file is one upload that appears whole or not at all, so a shard is never counted half-written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "codes": pa.array([np.asarray(r["codes"], np.int32) for r in rows], pa.list_(pa.int32())),
            "num_codes": pa.array([len(r["codes"]) for r in rows], pa.int32()),
            "duration": pa.array([r["duration"] for r in rows], pa.float64()),
            "num_samples": pa.array([r["num_samples"] for r in rows], pa.int64()),
            **columns.arrays([r.get("meta") for r in rows], types),
        },
        schema=schema(types),
    )
    if rows:
        plan.parquet(k).write_with(lambda f: pq.write_table(table, f))
    elif k in plan.written():
        plan.parquet(k).remove()
    plan.errors(k).write_bytes("".join(json.dumps(e) + "\n" for e in errors).encode())


def shard_stats(plan: Plan) -> tuple[int, float, list[dict]]:
    """(items written, their audio seconds, failed items) over all complete shards."""
    import pyarrow.parquet as pq

    num, seconds, errors = 0, 0.0, []
    written = plan.written()
    for k in plan.complete():
        if k in written:
            with plan.parquet(k).open("rb") as f:
                table = pq.read_table(f, columns=["duration"])
            num += table.num_rows
            seconds += float(np.sum(table["duration"].to_numpy()))
        lines = plan.errors(k).read_bytes().decode("utf-8").splitlines()
        errors += [json.loads(line) for line in lines if line.strip()]
    return num, seconds, errors


def write_summary(plan: Plan, job: dict, extra: dict) -> dict:
    """``errors.jsonl`` and ``manifest.json`` from the shards written; returns the manifest."""
    num, seconds, errors = shard_stats(plan)
    plan.out.child(ERRORS_FILE).write_bytes("".join(json.dumps(e) + "\n" for e in errors).encode())
    written = plan.written()
    manifest = {
        **job,
        **extra,
        "num_items": num,
        "num_errors": len(errors),
        "audio_seconds": seconds,
        "num_shards": len(plan.shards),
        "complete_shards": len(plan.complete()),
        "shards": [f"{DATA_DIR}/{plan.name(k)}.parquet" for k in range(len(plan.shards)) if k in written],
    }
    plan.out.child(MANIFEST_FILE).write_bytes(_json(manifest))
    return manifest
