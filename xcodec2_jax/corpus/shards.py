"""The output folder: a fixed plan of shards, each written whole or not at all, and the manifest.

Items are cut, in listing order, into shards of ``shard_size``; shard k goes to process
``k % num_processes``. The assignment depends only on the item list and the shard size, so a rerun
(with any number of processes) redoes exactly the shards that are missing. Shard k's rows go to
``data/train-KKKKK-of-NNNNN.parquet`` and its failed items to ``.errors/train-KKKKK-of-NNNNN.jsonl``,
each written under a temporary name and renamed into place, the errors file last: it is the mark of
a complete shard. (A shard whose items all failed has no Parquet file: datasets cannot read an empty
one.)

``job.json``, written when the folder is first used, pins the model, config, compute settings, shard
size and the digest of the item ids: a rerun that would mix different codes or shift the shards is
refused. ``manifest.json`` and ``errors.jsonl`` are rebuilt from the shards by process 0 at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from ..utils.files import atomic_write, atomic_write_json

DATA_DIR = "data"
ERRORS_DIR = ".errors"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"


def schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("codes", pa.list_(pa.int32())),
            ("num_codes", pa.int32()),
            ("duration", pa.float64()),
            ("num_samples", pa.int64()),
        ]
    )


class Plan:
    """Shards of a job: ``shards[k]`` is the list of item indices of shard k."""

    def __init__(self, out: str, num_items: int, shard_size: int):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        self.out = out
        self.shard_size = shard_size
        self.shards = [
            list(range(s, min(s + shard_size, num_items))) for s in range(0, num_items, shard_size)
        ]

    def name(self, k: int) -> str:
        return f"train-{k:05d}-of-{len(self.shards):05d}"

    def parquet(self, k: int) -> str:
        return os.path.join(self.out, DATA_DIR, self.name(k) + ".parquet")

    def errors(self, k: int) -> str:
        return os.path.join(self.out, ERRORS_DIR, self.name(k) + ".jsonl")

    def is_complete(self, k: int) -> bool:
        return os.path.isfile(self.errors(k))

    def mine(self, process_id: int, num_processes: int) -> list[int]:
        """This process's shards that are not complete yet."""
        return [k for k in range(process_id, len(self.shards), num_processes) if not self.is_complete(k)]


def ids_digest(ids: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for i in ids:
        digest.update(i.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def check_job(out: str, job: dict, create: bool) -> None:
    """Refuse an OUT made by another job (model, config, settings, items); write ``job.json`` if new."""
    path = os.path.join(out, JOB_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
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
    if os.path.isdir(os.path.join(out, DATA_DIR)) and os.listdir(os.path.join(out, DATA_DIR)):
        raise ValueError(
            f"{out}/{DATA_DIR} holds files but {out} has no {JOB_FILE}: not an output folder of ours"
        )
    atomic_write_json(path, job)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def write_shard(plan: Plan, k: int, rows: list[dict], errors: list[dict]) -> None:
    """Shard k's rows (in item order) and failed items; complete once the errors file is renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "codes": pa.array([np.asarray(r["codes"], np.int32) for r in rows], pa.list_(pa.int32())),
            "num_codes": pa.array([len(r["codes"]) for r in rows], pa.int32()),
            "duration": pa.array([r["duration"] for r in rows], pa.float64()),
            "num_samples": pa.array([r["num_samples"] for r in rows], pa.int64()),
        },
        schema=schema(),
    )
    if rows:
        atomic_write(plan.parquet(k), lambda f: pq.write_table(table, f))
    elif os.path.exists(plan.parquet(k)):
        os.unlink(plan.parquet(k))
    atomic_write(plan.errors(k), lambda f: f.write("".join(json.dumps(e) + "\n" for e in errors).encode()))


def shard_stats(plan: Plan) -> tuple[int, float, list[dict]]:
    """(items written, their audio seconds, failed items) over all complete shards."""
    import pyarrow.parquet as pq

    num, seconds, errors = 0, 0.0, []
    for k in range(len(plan.shards)):
        if not plan.is_complete(k):
            continue
        if os.path.isfile(plan.parquet(k)):
            table = pq.read_table(plan.parquet(k), columns=["duration"])
            num += table.num_rows
            seconds += float(np.sum(table["duration"].to_numpy()))
        with open(plan.errors(k), encoding="utf-8") as f:
            errors += [json.loads(line) for line in f if line.strip()]
    return num, seconds, errors


def write_summary(plan: Plan, job: dict, extra: dict) -> dict:
    """``errors.jsonl`` and ``manifest.json`` from the shards on disk; returns the manifest."""
    num, seconds, errors = shard_stats(plan)
    atomic_write(
        os.path.join(plan.out, ERRORS_FILE),
        lambda f: f.write("".join(json.dumps(e) + "\n" for e in errors).encode()),
    )
    complete = sum(plan.is_complete(k) for k in range(len(plan.shards)))
    manifest = {
        **job,
        **extra,
        "num_items": num,
        "num_errors": len(errors),
        "audio_seconds": seconds,
        "num_shards": len(plan.shards),
        "complete_shards": complete,
        "shards": [
            os.path.join(DATA_DIR, plan.name(k) + ".parquet")
            for k in range(len(plan.shards))
            if os.path.isfile(plan.parquet(k))
        ],
    }
    atomic_write_json(os.path.join(plan.out, MANIFEST_FILE), manifest)
    return manifest
