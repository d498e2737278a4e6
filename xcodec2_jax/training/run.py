"""``xcodec2-jax train``: a whole training run, resumable, logged, ending in a loadable model.

``OUT`` holds:

- ``train.json``: the run's recipe, model and data settings; a rerun must match them (``steps``,
  ``save_every`` and ``sample_every`` may change, so a finished run can be extended);
- ``checkpoints/<step>/``: Orbax checkpoints of the whole :class:`~.recipe.GanState` (generator,
  discriminators, both optimiser states; the step is also the data position, since a batch is a
  function of the seed and the step), the last two kept;
- ``train_log.jsonl``: per step, every metric of :data:`~.recipe.METRICS`, ``steps_per_second`` and
  ``seconds``; TensorBoard event files beside it when ``tensorboardX`` is installed;
- ``samples/``: ``reference.wav`` and its reconstruction ``step_<k>.wav`` every ``sample_every`` steps;
- ``errors.jsonl``: items that could not be read, with the reason;
- at the end: the codec itself (``config.json`` + Orbax ``params/``: what
  ``Xcodec2Codec.from_pretrained(OUT)`` and ``load_checkpoint(OUT)`` read) and the training-only parts
  (``training_parts/``), read back when ``OUT`` is the ``model`` of another run.

A rerun of the same command resumes from the last checkpoint; the log's later lines are dropped and
redone, so the losses are those of a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from ..checkpoint import load_checkpoint, save_orbax
from ..checkpoint.export import load_semantic_encoder, semantic_config_from
from ..config import Xcodec2Config
from ..corpus.run import init_distributed
from ..corpus.sources import Item, list_items
from ..inference.compilation_cache import enable_compilation_cache
from ..modeling.model import init_params
from ..utils import validation
from ..utils.files import atomic_write_json
from ..utils.hub import resolve_checkpoint
from ..utils.progress import progress_bar
from .data import Crops, Prefetcher
from .generator import TRAINING_ONLY, Generator
from .recipe import METRICS, Recipe, RecipeTrainer

LOG_NAME = "train_log.jsonl"
SETTINGS_NAME = "train.json"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
ERRORS_NAME = "errors.jsonl"
TRAINING_PARTS_DIR = "training_parts"

# ``--config small``: a codec of about 30M parameters besides its semantic encoder, for experiments.
SMALL = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    encoder_hidden_size=32,
)


def segment_samples(config: Xcodec2Config, seconds: float) -> int:
    """Samples of an S-second crop, rounded to whole codes (at least 2)."""
    hop = config.hop_length
    return max(2, round(seconds * config.sampling_rate / hop)) * hop


def config_for_scratch(choice: str, semantic_model: str) -> Xcodec2Config:
    """The codec config of ``--config small|full|config.json`` around the semantic model's shapes."""
    if choice in ("small", "full"):
        data = dict(SMALL) if choice == "small" else {}
    else:
        with open(choice, encoding="utf-8") as f:
            data = json.load(f)
    base = Xcodec2Config.from_dict(data)
    semantic = semantic_config_from(semantic_model, base.semantic_model_config.num_hidden_layers)
    width = base.hidden_size + semantic.hidden_size
    return dataclasses.replace(base, semantic_model_config=semantic, quantization_dim=width)


def _training_parts(path: str) -> dict | None:
    folder = os.path.join(path, TRAINING_PARTS_DIR)
    if not os.path.isdir(folder):
        return None
    import orbax.checkpoint as ocp

    return dict(ocp.PyTreeCheckpointer().restore(folder))


def starting_generator(model, config, semantic_model, seed: int, say) -> tuple[Xcodec2Config, dict]:
    """(config, generator params) to start from: a checkpoint's, or random ones around a w2v-BERT.

    The training-only parts come from ``model``'s ``training_parts/`` when it has them, else fresh."""
    if (model is None) == (config is None):
        raise ValueError("give either model (a checkpoint to start from) or config (to train from scratch)")
    if model is not None:
        path = resolve_checkpoint(model)
        config, params = load_checkpoint(path)
        parts = _training_parts(path)
    else:
        if semantic_model is None:
            raise ValueError(
                "training from scratch needs semantic_model (--semantic-model DIR): a transformers "
                "Wav2Vec2BertModel checkpoint; w2v-BERT stays frozen, so random weights would teach nothing"
            )
        config = config_for_scratch(config, os.fspath(semantic_model))
        params = dict(jax.device_get(init_params(config, jax.random.key(seed))))
        params["semantic_encoder"] = load_semantic_encoder(semantic_model, config)
        parts = None
    params = dict(params)
    if parts is None:
        parts = Generator(config).init_training_parts(jax.random.key(seed + 1))
        say(f"{', '.join(TRAINING_ONLY)} initialised fresh (released checkpoints do not hold them)")
    params.update(parts)
    return config, params


def _check_settings(path: str, settings: dict, resuming: bool) -> None:
    """Refuse to resume a run under another recipe, model or data; else record the settings."""
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ValueError(
                f"{os.path.dirname(path)} holds a run with other settings ({changed}; was, now): resuming "
                "it would not be exact; use another output folder"
            )
        return
    atomic_write_json(path, settings)


def _read_log(path: str, upto: int) -> list[dict]:
    """The log's entries of steps 1..upto (later ones were not checkpointed and are redone)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if e["step"] <= upto]


class StateCheckpoints:
    """Orbax checkpoints of a train state under ``directory`` (the last ``keep``)."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state) -> None:
        step = int(state.step)
        if step != self.manager.latest_step():
            self.manager.save(step, args=self._ocp.args.StandardSave(state))

    def restore(self, abstract, step: int):
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class RunOutput:
    """The writers of one run's folder (log, TensorBoard, samples, errors); only process 0 writes."""

    def __init__(self, output: str, log: list[dict], tensorboard: bool | None, say):
        self.output = output
        self.writes = jax.process_index() == 0
        self.say = say
        self.writer = None
        if not self.writes:
            return
        with open(os.path.join(output, LOG_NAME), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in log)
        self.log_file = open(os.path.join(output, LOG_NAME), "a", encoding="utf-8")
        if tensorboard is not False:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ImportError(
                        'TensorBoard logs need tensorboardX: pip install "xcodec2_jax[tensorboard]"'
                    ) from None
                say('no TensorBoard logs (pip install "xcodec2_jax[tensorboard]" to write them)')
            else:
                self.writer = SummaryWriter(output)

    def log(self, entry: dict) -> None:
        if not self.writes:
            return
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step":
                    self.writer.add_scalar(key, value, entry["step"])

    def sample(self, name: str, audio: np.ndarray, step: int, rate: int) -> None:
        if not self.writes:
            return
        import soundfile as sf

        folder = os.path.join(self.output, SAMPLES_DIR)
        os.makedirs(folder, exist_ok=True)
        sf.write(os.path.join(folder, f"{name}.wav"), audio, rate, subtype="FLOAT")
        if self.writer is not None:
            self.writer.add_audio(f"samples/{name.split('_')[0]}", audio, step, sample_rate=rate)

    def close(self) -> None:
        if self.writes:
            self.log_file.close()
            if self.writer is not None:
                self.writer.close()


class _ErrorLog:
    """Unreadable items: one line on stderr and one in ``errors.jsonl`` each (process 0); an item
    already in the file (a resumed run meets it again) is not written twice."""

    def __init__(self, output: str):
        self.file = os.path.join(output, ERRORS_NAME)
        self.recorded = set()
        if os.path.exists(self.file):
            with open(self.file, encoding="utf-8") as f:
                self.recorded = {json.loads(line)["id"] for line in f if line.strip()}

    def __call__(self, item: Item, reason: str) -> None:
        if jax.process_index() != 0:
            return
        _say(f"{item.path}: skipped: {reason}")
        if item.id in self.recorded:
            return
        self.recorded.add(item.id)
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": item.id, "path": item.path, "error": reason}) + "\n")


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"xcodec2-jax: {message}", file=sys.stderr)


@dataclasses.dataclass
class RunSpec:
    """The loop's settings: ``steps`` in all, global ``batch_size``, checkpoint and sample periods."""

    steps: int
    batch_size: int
    samples: int
    save_every: int
    sample_every: int | None
    progress: bool


# long: a run's set-up, in the order a reader checks it (inputs, model, resume, data), then the loop
def train(
    data: str | Sequence[str],
    output: str,
    *,
    recipe: Recipe | None = None,
    model: str | None = None,
    config: str | None = None,
    semantic_model: str | None = None,
    steps: int = 1000,
    batch_size: int = 8,
    segment_seconds: float = 6.0,
    save_every: int = 1000,
    sample_every: int | None = None,
    seed: int = 0,
    devices=None,
    progress: bool = True,
    tensorboard: bool | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    distributed: bool = False,
    storage_options: dict | None = None,
) -> list[dict]:
    """Train the codec on ``data``; see the module docstring for ``output``'s layout.

    Args:
        data: what ``tokenize`` reads (folders, manifests, Parquet, tar shards; paths or URLs), one or
            several; ``storage_options``: the options of their filesystems, as for tokenize.
        output: the run's folder (created; a rerun resumes it).
        recipe: hyper-parameters (default :class:`~.recipe.Recipe`: X-Codec-2.0's).
        model: checkpoint (directory or Hub id) to start from; or ``config`` (``"small"``, ``"full"``
            or a ``config.json``) with ``semantic_model`` (a transformers ``Wav2Vec2BertModel``
            directory) to start from random weights.
        steps: optimiser steps in all; batch_size: crops per step over every device and process;
            segment_seconds: crop length; save_every / sample_every: periods in steps.
        seed: of the crops, of fresh parameters and of the dropout masks.
        devices: the mesh's devices (default every device of every process).
        tensorboard: True requires ``tensorboardX``, False skips it, None uses it when installed.
        coordinator_address, num_processes, process_id, distributed: ``jax.distributed``, as tokenize.

    Returns:
        The log entries of every step (those of a resumed run's earlier steps included).
    """
    recipe = Recipe() if recipe is None else recipe
    validation.positive_int(steps, "steps")
    validation.positive_int(save_every, "save_every")
    validation.positive_int(batch_size, "batch_size")
    if sample_every is not None:
        validation.positive_int(sample_every, "sample_every")
    if not validation.finite_number(segment_seconds, "segment_seconds") > 0:
        raise ValueError(f"segment_seconds must be positive, got {segment_seconds!r}")
    init_distributed(coordinator_address, num_processes, process_id, distributed)
    items = list_items([data] if isinstance(data, (str, os.PathLike)) else list(data), storage_options)
    output = os.path.abspath(os.fspath(output))
    os.makedirs(output, exist_ok=True)
    errors = _ErrorLog(output)
    crops = Crops(items, seed, on_bad=errors)
    first = crops.first_usable()
    enable_compilation_cache()
    config_, generator = starting_generator(model, config, semantic_model, seed, _say)
    trainer = trainer_for(config_, recipe, devices)
    if batch_size % trainer.num_devices:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {trainer.num_devices} devices")
    samples = segment_samples(config_, segment_seconds)
    settings = dict(
        recipe=recipe.to_dict(),
        model=None if model is None else os.fspath(model),
        config=config,
        semantic_model=None if semantic_model is None else os.fspath(semantic_model),
        codec=config_.to_dict(),
        batch_size=batch_size,
        segment_samples=samples,
        seed=seed,
        items=len(items),
    )
    checkpoints = StateCheckpoints(os.path.join(output, CHECKPOINTS_DIR))
    start = checkpoints.latest_step() or 0
    try:
        _check_settings(os.path.join(output, SETTINGS_NAME), settings, resuming=bool(start))
    except ValueError:
        checkpoints.close()
        raise
    # A resumed run restores the discriminators: their shapes are enough.
    init = functools.partial(trainer.discriminators.init, samples=samples)
    key = jax.random.key(seed + 2)
    discriminators = {} if not recipe.adversarial else jax.eval_shape(init, key) if start else init(key)
    if start:
        state = checkpoints.restore(trainer.abstract_state(generator, discriminators), start)
        frozen = trainer.frozen(generator)
    else:
        state, frozen = trainer.init_state(generator, discriminators, seed)
    del generator, discriminators
    log = _read_log(os.path.join(output, LOG_NAME), start)
    out = RunOutput(output, log, tensorboard, _say)
    try:
        spec = RunSpec(steps, batch_size, samples, save_every, sample_every, progress)
        sampler = _Sampler(trainer, first, samples, out) if sample_every else None
        state = _loop(trainer, state, frozen, crops, checkpoints, out, log, start, spec, sampler)
    finally:
        checkpoints.close()
        out.close()
    _save_model(output, state, frozen, config_)
    return log


def trainer_for(config: Xcodec2Config, recipe: Recipe, devices=None) -> RecipeTrainer:
    """One trainer per (config, recipe, devices) and process: a second run in the same process (a
    resumed one, a notebook's) reuses its traced and compiled step."""
    return _cached_trainer(config, recipe, None if devices is None else tuple(devices))


@functools.lru_cache(maxsize=4)
def _cached_trainer(config: Xcodec2Config, recipe: Recipe, devices: tuple | None) -> RecipeTrainer:
    return RecipeTrainer(config, recipe, devices)


def _rows(batch_size: int) -> range:
    """This process's rows of the global batch (the data axis runs over processes in order)."""
    per = batch_size // jax.process_count()
    return range(jax.process_index() * per, (jax.process_index() + 1) * per)


# long: one loop, each step's logging, checkpointing and sampling spelled out in order
def _loop(
    trainer: RecipeTrainer, state, frozen, crops: Crops, checkpoints, out: RunOutput, log, start, spec, sample
):
    """Steps ``start + 1 .. spec.steps``: each logged, the state saved every ``save_every`` steps and at
    the end, a sample decoded every ``sample_every`` (by ``sample``); returns the final state."""
    bar = progress_bar(None, "train", "step", spec.progress, total=spec.steps, initial=start)
    began = time.perf_counter()
    for step, rows in enumerate(
        Prefetcher(crops, _rows(spec.batch_size), spec.samples, start, spec.steps), start
    ):
        state, metrics = trainer.step(state, frozen, rows)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        entry = {"step": step + 1, **{k: metrics[k] for k in METRICS}}
        entry.update(steps_per_second=1.0 / max(now - began, 1e-9), seconds=now - began)
        began = now
        log.append(entry)
        out.log(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(mel=f"{entry['loss/mel']:.3f}")
        if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
            checkpoints.save(state)
        if sample is not None and ((step + 1) % spec.sample_every == 0 or step + 1 == spec.steps):
            sample(state, frozen, step + 1)
    if bar is not None:
        bar.close()
    return state


class _Sampler:
    """The reconstruction of one fixed crop (the first readable item's start), written as a sample."""

    def __init__(self, trainer: RecipeTrainer, audio: np.ndarray, samples: int, out: RunOutput):
        audio = audio[:samples]
        self.audio = np.zeros((1, samples), np.float32)
        self.audio[0, : len(audio)] = audio
        self.out = out
        self.rate = trainer.config.sampling_rate
        generator = trainer.generator
        self.forward = jax.jit(lambda g, f, a: generator({**f, **g}, a, with_semantic=False).audio)
        out.sample("reference", self.audio[0], 0, self.rate)

    def __call__(self, state, frozen, step: int) -> None:
        audio = np.asarray(jax.device_get(self.forward(state.generator, frozen, self.audio)))[0]
        self.out.sample(f"step_{step:08d}", audio, step, self.rate)


def _save_model(output: str, state, frozen, config: Xcodec2Config) -> None:
    """The codec (Orbax ``params/`` + ``config.json``) and its training-only parts, under ``output``."""
    import orbax.checkpoint as ocp

    params = {**jax.device_get(frozen), **jax.device_get(state.generator)}
    codec = {k: v for k, v in params.items() if k not in TRAINING_ONLY}
    save_orbax(output, codec, config, overwrite=True)
    parts = {k: params[k] for k in TRAINING_ONLY if k in params}
    if parts:
        ocp.PyTreeCheckpointer().save(os.path.join(output, TRAINING_PARTS_DIR), parts, force=True)
