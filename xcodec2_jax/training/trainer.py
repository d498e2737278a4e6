"""Training with optax: a train state, a data-parallel jitted step, and Orbax checkpoints of it.

Only the trainable submodules' parameters (top-level names of the model's tree, the decoder by
default) live in the :class:`TrainState` with their optimizer state; the rest are frozen, passed
to the step as a separate replicated tree and never differentiated. With every encoder-side module
frozen, the step encodes each batch to codes in float32 (codes exactly as the reference gives them,
whatever the compute dtype) and decodes the codes: the decoder is fine-tuned on what it sees at
inference. When an encoder module trains, the step decodes the encoder's latents instead, so the
loss reaches it through the quantizer (past FSQ's rounding only with straight-through latents).

The step is one ``jax.jit`` over a :class:`jax.sharding.Mesh` of the given devices (default: all
local ones) with one axis, ``"data"``: the batch is split along it, params and optimizer state are
replicated, and XLA all-reduces the gradients. The loss is a function of the whole batch, so it is
the same (to float rounding) on one device or many.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import Xcodec2Config
from ..modeling.features import fbank_features_jax
from ..modeling.layout import PRE_QUANTIZER_MODULES
from ..modeling.model import Xcodec2Model
from ..utils.dtypes import COMPUTE_DTYPES, compute_dtype
from .losses import mel_loss, multi_resolution_stft_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a fine-tune. ``warmup_steps`` None: 5% of ``steps`` (at least 1).

    AdamW (``weight_decay`` on matrices only, not on biases, norms or SnakeBeta's alpha/beta) under a
    linear warm-up to ``learning_rate`` then cosine decay to ``learning_rate · final_lr_ratio`` at
    ``steps``; gradients clipped to a global norm of ``clip_norm`` (None: no clipping).
    """

    steps: int = 1000
    learning_rate: float = 1e-4
    warmup_steps: int | None = None
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    trainable: tuple[str, ...] = ("acoustic_decoder",)
    compute_dtype: str = "float32"
    mel_weight: float = 1.0
    stft_weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if not self.trainable:
            raise ValueError("trainable names no module: nothing would train")
        object.__setattr__(self, "trainable", tuple(self.trainable))

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 20) if self.warmup_steps is None else self.warmup_steps


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=tc.warmup,
        decay_steps=max(tc.steps, tc.warmup + 1),
        end_value=tc.learning_rate * tc.final_lr_ratio,
    )


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(tc),
        weight_decay=tc.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )
    return adamw if tc.clip_norm is None else optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)


@flax.struct.dataclass
class TrainState:
    """What a step updates: ``step`` (int32 scalar, steps done), trainable ``params``, ``opt_state``."""

    step: jnp.ndarray
    params: Any
    opt_state: Any


def split_params(params: Mapping[str, Any], trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees of the model's parameter tree, by top-level module name."""
    unknown = [name for name in trainable if name not in params]
    if unknown:
        raise ValueError(f"no such module(s) {unknown} in the model; choose from {sorted(params)}")
    return (
        {k: v for k, v in params.items() if k in trainable},
        {k: v for k, v in params.items() if k not in trainable},
    )


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    return {**frozen, **trainable}


def make_mesh(devices=None) -> Mesh:
    """A one-axis ``"data"`` mesh over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def segment_samples(config: Xcodec2Config, seconds: float) -> int:
    """Samples of an S-second training segment, rounded to whole codes (at least 2)."""
    hop = config.hop_length
    return max(2, round(seconds * 16000 / hop)) * hop


class Trainer:
    """The jitted, data-parallel train step for one model config, train config and mesh.

    ``optimizer`` replaces the default of :func:`make_optimizer` (the schedule logged stays ``tc``'s).
    ``step(state, frozen, audio)`` takes (B, T) float32 segments (T a multiple of the hop, B a
    multiple of the device count) and returns ``(state, metrics)`` with ``loss``, ``mel``, ``stft``
    and ``grad_norm``; ``state`` is donated.
    """

    def __init__(
        self,
        config: Xcodec2Config,
        tc: TrainConfig,
        devices=None,
        optimizer: optax.GradientTransformation | None = None,
    ):
        self.config = config
        self.tc = tc
        self.mesh = make_mesh(devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.optimizer = make_optimizer(tc) if optimizer is None else optimizer
        self.schedule = learning_rate_schedule(tc)
        dtype = compute_dtype(tc.compute_dtype)
        self.trains_encoder = any(name in PRE_QUANTIZER_MODULES for name in tc.trainable)
        self.model = Xcodec2Model(config, dtype=dtype)
        # A frozen encoder gives codes as the reference's: always in float32.
        self.encoder = self.model if self.trains_encoder else Xcodec2Model(config)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.replicated, self.replicated, self.data_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def init_state(self, params: Mapping[str, Any]) -> tuple[TrainState, dict]:
        """(state at step 0, frozen params), placed on the mesh (replicated)."""
        trainable, frozen = split_params(params, self.tc.trainable)
        trainable = jax.device_put(trainable, self.replicated)
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
            params=trainable,
            opt_state=jax.jit(self.optimizer.init, out_shardings=self.replicated)(trainable),
        )
        return state, jax.device_put(frozen, self.replicated)

    def abstract_state(self, params: Mapping[str, Any]) -> TrainState:
        """Shapes, dtypes and shardings of :meth:`init_state`'s state, for restoring a checkpoint."""
        trainable, _ = split_params(params, self.tc.trainable)
        shapes = jax.eval_shape(
            lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.optimizer.init(p)), trainable
        )
        replicated = self.replicated
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)

    def loss(self, trainable, frozen, audio):
        """(loss, (mel, stft)) of reconstructing (B, T) ``audio`` through the codec."""
        params = merge_params(trainable, frozen)
        hop = self.config.hop_length
        b, t = audio.shape
        # As the feature extractor pads an item: one zero sample appended, then zeros up to the hop.
        padded = jnp.pad(audio, ((0, 0), (0, hop)))
        lengths = jnp.full((b,), t + 1, jnp.int32)
        features, features_mask = fbank_features_jax(padded, lengths, hop_length=hop)
        enc = self.encoder.apply(
            {"params": params},
            padded[:, None],
            features,
            input_features_mask=features_mask,
            output_latents=self.trains_encoder,
            method=Xcodec2Model.encode,
        )
        if self.trains_encoder:
            out = self.model.apply({"params": params}, latents=enc.latents, method=Xcodec2Model.decode)
        else:
            out = self.model.apply({"params": params}, enc.audio_codes, method=Xcodec2Model.decode)
        recon = out.audio_values[:, 0, :t].astype(jnp.float32)
        mel = mel_loss(recon, audio)
        stft = multi_resolution_stft_loss(recon, audio)
        return self.tc.mel_weight * mel + self.tc.stft_weight * stft, (mel, stft)

    def _train_step(self, state: TrainState, frozen, audio):
        (loss, (mel, stft)), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, frozen, audio)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, mel=mel, stft=stft, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def step(self, state: TrainState, frozen, audio) -> tuple[TrainState, dict]:
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 2 or audio.shape[1] % self.config.hop_length:
            raise ValueError(
                f"audio must be (batch, samples) with samples a multiple of {self.config.hop_length}, "
                f"got {audio.shape}"
            )
        if audio.shape[0] % self.num_devices:
            raise ValueError(
                f"batch size {audio.shape[0]} is not a multiple of the {self.num_devices} devices"
            )
        return self._step(state, frozen, jax.device_put(audio, self.data_sharding))


class StateCheckpoints:
    """Orbax checkpoints of the whole :class:`TrainState` under ``directory`` (the last ``keep``)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.fspath(directory)),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if step != self.manager.latest_step():
            self.manager.save(step, args=self._ocp.args.StandardSave(state))

    def restore(self, abstract: TrainState, step: int | None = None) -> TrainState:
        step = self.manager.latest_step() if step is None else step
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
