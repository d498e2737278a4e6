"""Fine-tune the decoder on a folder or manifest of audio: ``xcodec2-jax finetune``.

Output folder layout: ``checkpoints/<step>/`` (Orbax, the whole train state, every ``save_every``
steps and at the end), ``train_log.jsonl`` (one line per step), ``finetune.json`` (the run's
settings; a rerun must match them), and, once done, the fine-tuned model itself (``config.json``
and Orbax ``params/``), which ``Xcodec2Codec.from_pretrained(OUT)`` loads.

Resume is exact: the batch of step k is drawn from a generator seeded by ``(seed, k)`` alone, so a
run restarted from its step-k checkpoint sees the same batches, and computes the same losses, as
one that never stopped. Log lines past the checkpoint (steps done but not saved) are dropped and
redone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from ..checkpoint import load_checkpoint, save_orbax
from ..corpus.sources import list_items, read_item
from ..inference.compilation_cache import enable_compilation_cache
from ..inference.hub import DEFAULT_MODEL_ID, resolve_checkpoint
from ..utils import validation
from ..utils.files import AUDIO_SUFFIXES, atomic_write_json
from ..utils.progress import progress_bar
from .trainer import StateCheckpoints, TrainConfig, Trainer, merge_params, segment_samples

LOG_NAME = "train_log.jsonl"
SETTINGS_NAME = "finetune.json"
CHECKPOINTS_DIR = "checkpoints"


def _warn(path: str, problem: str) -> None:
    print(f"xcodec2-jax: {path}: skipped: {' '.join(str(problem).split())}", file=sys.stderr)


class Segments:
    """Random fixed-length segments of a set of clips, a pure function of the step.

    Batch k's items pick a clip with probability proportional to its length (every second of audio
    equally likely) and a uniform offset in it; a clip shorter than the segment is zero-padded.
    """

    def __init__(self, clips: Sequence[np.ndarray], samples: int, seed: int = 0):
        if not clips:
            raise ValueError("no audio to draw segments from")
        self.clips = list(clips)
        self.samples = samples
        self.seed = seed
        lengths = np.asarray([len(c) for c in self.clips], np.float64)
        self.weights = lengths / lengths.sum()

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        out = np.zeros((batch_size, self.samples), np.float32)
        for row, index in enumerate(rng.choice(len(self.clips), size=batch_size, p=self.weights)):
            clip = self.clips[index]
            start = int(rng.integers(0, max(len(clip) - self.samples, 0) + 1))
            piece = clip[start : start + self.samples]
            out[row, : len(piece)] = piece
        return out


def load_clips(data: str) -> list[np.ndarray]:
    """Every readable clip of ``data`` (what ``tokenize`` reads: a folder, a ``.txt``/``.lst``/``.jsonl``
    manifest, Parquet); unreadable ones skipped with one line on stderr each."""
    suffixes = ", ".join(AUDIO_SUFFIXES)
    try:
        items = list_items([data])
    except ValueError:
        if os.path.isdir(data):  # a folder without audio: say it as for unreadable files
            what = f"it holds no audio files; audio files end in {suffixes}"
            raise ValueError(f"{data}: no usable audio ({what})") from None
        raise
    clips = []
    for item in items:
        try:
            clips.append(read_item(item))
        except ValueError as e:
            _warn(item.path, str(e))
    if not clips:
        what = f"none of its {len(items)} file(s) could be read"
        raise ValueError(f"{data}: no usable audio ({what}; audio files end in {suffixes})")
    return clips


def _read_log(path: str, upto: int) -> list[dict]:
    """The log's entries of steps 1..upto (later ones were not checkpointed and are redone)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if e["step"] <= upto]


def _check_settings(path: str, settings: dict, resuming: bool) -> None:
    """Refuse to resume a run under other settings (its resume would not be exact); else record them."""
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ValueError(
                f"{os.path.dirname(path)} holds a fine-tune with other settings ({changed}; was, now): "
                "resuming it would not be exact; use another output folder"
            )
        return
    atomic_write_json(path, settings)


# long: the run's settings checked and recorded before training; the loop is _train
def finetune(
    data: str,
    output: str,
    *,
    model: str | None = None,
    steps: int = 1000,
    batch_size: int = 4,
    segment_seconds: float = 2.0,
    learning_rate: float = 1e-4,
    save_every: int = 500,
    seed: int = 0,
    compute_dtype: str = "float32",
    trainable: Sequence[str] = ("acoustic_decoder",),
    devices=None,
    progress: bool = True,
) -> list[dict]:
    """Fine-tune ``model`` (a checkpoint directory or Hub id) on ``data``; see the module docstring.

    Returns the log entries of every step (those of a resumed run's earlier steps included).
    """
    validation.positive_int(save_every, "save_every")
    validation.positive_int(batch_size, "batch_size")
    if not validation.finite_number(segment_seconds, "segment_seconds") > 0:
        raise ValueError(f"segment_seconds must be positive, got {segment_seconds!r}")
    tc = TrainConfig(
        steps=steps, learning_rate=learning_rate, trainable=tuple(trainable), compute_dtype=compute_dtype
    )
    model = DEFAULT_MODEL_ID if model is None else os.fspath(model)
    output = os.path.abspath(os.fspath(output))
    clips = load_clips(os.fspath(data))
    settings = dict(
        model=model,
        steps=steps,
        batch_size=batch_size,
        segment_seconds=segment_seconds,
        learning_rate=learning_rate,
        seed=seed,
        compute_dtype=compute_dtype,
        trainable=list(tc.trainable),
        clips=len(clips),
    )
    enable_compilation_cache()
    config, params = load_checkpoint(resolve_checkpoint(model))
    trainer = Trainer(config, tc, devices)
    if batch_size % trainer.num_devices:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {trainer.num_devices} devices")
    segments = Segments(clips, segment_samples(config, segment_seconds), seed)
    os.makedirs(output, exist_ok=True)
    checkpoints = StateCheckpoints(os.path.join(output, CHECKPOINTS_DIR))
    start = checkpoints.latest_step() or 0
    try:
        _check_settings(os.path.join(output, SETTINGS_NAME), settings, resuming=bool(start))
    except ValueError:
        checkpoints.close()
        raise
    state, frozen = trainer.init_state(params)
    if start:
        state = checkpoints.restore(trainer.abstract_state(params), start)
    del params
    log = _read_log(os.path.join(output, LOG_NAME), start)
    state = _train(
        trainer, state, frozen, segments, checkpoints, log, output, steps, batch_size, save_every, progress
    )
    save_orbax(output, merge_params(state.params, frozen), config, overwrite=True)
    return log


def _train(
    trainer, state, frozen, segments, checkpoints, log, output, steps, batch_size, save_every, progress
):
    """Steps ``len(log)`` .. ``steps``, each logged (appended to ``log`` and the log file) and the
    state saved every ``save_every`` steps and at the end; returns the final state."""
    start = len(log)
    log_file = os.path.join(output, LOG_NAME)
    with open(log_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in log)
    bar = progress_bar(None, "finetune", "step", progress, total=steps, initial=start)
    with open(log_file, "a", encoding="utf-8") as f:
        for step in range(start, steps):
            began = time.perf_counter()
            state, metrics = trainer.step(state, frozen, segments.batch(step, batch_size))
            entry = dict(
                step=step + 1, **{k: float(metrics[k]) for k in ("loss", "mel", "stft", "grad_norm")}
            )
            entry.update(lr=float(trainer.schedule(step)), seconds=time.perf_counter() - began)
            f.write(json.dumps(entry) + "\n")
            f.flush()
            log.append(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if (step + 1) % save_every == 0 or step + 1 == steps:
                checkpoints.save(state)
    if bar is not None:
        bar.close()
    checkpoints.wait()
    checkpoints.close()
    return state
