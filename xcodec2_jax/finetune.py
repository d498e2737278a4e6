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

from .codec import read_audio
from .train import StateCheckpoints, TrainConfig, Trainer, merge_params, segment_samples

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
MANIFEST_SUFFIXES = (".txt", ".lst", ".jsonl")
LOG_NAME = "train_log.jsonl"
SETTINGS_NAME = "finetune.json"
CHECKPOINTS_DIR = "checkpoints"


def _warn(path: str, problem: str) -> None:
    print(f"xcodec2-jax: {path}: skipped: {' '.join(str(problem).split())}", file=sys.stderr)


def audio_paths(data: str) -> list[str]:
    """The audio files of ``data``: a folder (searched recursively) or a manifest.

    A manifest (``.txt``/``.lst``: one path per line; ``.jsonl``: objects with a ``"path"`` or
    ``"audio"`` key) lists files relative to its own folder or absolute; blank lines and ``#``
    comments are skipped.
    """
    if os.path.isdir(data):
        found = []
        for dirpath, dirnames, filenames in os.walk(data):
            dirnames.sort()
            names = [n for n in sorted(filenames) if n.lower().endswith(AUDIO_SUFFIXES)]
            found += [os.path.join(dirpath, n) for n in names]
        return found
    if not os.path.isfile(data):
        raise ValueError(f"{data}: no such file or directory")
    if not data.lower().endswith(MANIFEST_SUFFIXES):
        raise ValueError(f"{data}: expected a folder of audio or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    root = os.path.dirname(os.path.abspath(data))
    paths = []
    with open(data, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if data.lower().endswith(".jsonl"):
                try:
                    entry = json.loads(line)
                    line = entry.get("path", entry.get("audio"))
                except (json.JSONDecodeError, AttributeError):
                    line = None
                if not isinstance(line, str):
                    _warn(f"{data}:{number}", 'expected a JSON object with a "path" string')
                    continue
            paths.append(os.path.join(root, line))
    return paths


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
    """Every readable clip of ``data``; unreadable ones skipped with one line on stderr each."""
    paths = audio_paths(data)
    clips = []
    for path in paths:
        try:
            clips.append(read_audio(path))
        except ValueError as e:
            _warn(path, str(e))
    if not clips:
        what = f"none of its {len(paths)} file(s) could be read" if paths else "it holds no audio files"
        raise ValueError(f"{data}: no usable audio ({what}; audio files end in {', '.join(AUDIO_SUFFIXES)})")
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
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


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
    from tqdm.auto import tqdm

    from .cache import enable_compilation_cache
    from .checkpoint import load_checkpoint, save_orbax
    from .codec import DEFAULT_MODEL_ID, _resolve_checkpoint

    if not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not segment_seconds > 0:
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
    config, params = load_checkpoint(_resolve_checkpoint(model, None, None))
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
    log_file = os.path.join(output, LOG_NAME)
    log = _read_log(log_file, start)
    with open(log_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in log)

    bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", disable=None if progress else True)
    with open(log_file, "a", encoding="utf-8") as f:
        for step in range(start, steps):
            began = time.perf_counter()
            state, metrics = trainer.step(state, frozen, segments.batch(step, batch_size))
            loss = float(metrics["loss"])
            entry = dict(
                step=step + 1,
                loss=loss,
                mel=float(metrics["mel"]),
                stft=float(metrics["stft"]),
                grad_norm=float(metrics["grad_norm"]),
                lr=float(trainer.schedule(step)),
                seconds=time.perf_counter() - began,
            )
            f.write(json.dumps(entry) + "\n")
            f.flush()
            log.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if (step + 1) % save_every == 0 or step + 1 == steps:
                checkpoints.save(state)
    bar.close()
    checkpoints.wait()
    checkpoints.close()
    save_orbax(output, merge_params(state.params, frozen), config, overwrite=True)
    return log
