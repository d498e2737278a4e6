"""X-Codec2's training recipe as one jitted, data-parallel step: discriminators, then generator.

The recipe (X-Codec-2.0's ``config/train/default.yaml`` and ``lightning_module.py``):

- generator loss = 15 · multi-resolution mel L1 + 1 · LSGAN adversarial + 1 · feature matching
  (both discriminators) + 5 · semantic reconstruction MSE;
- discriminator loss = LSGAN real + fake over the multi-period and the spectrogram discriminators;
- both optimisers AdamW (betas (0.8, 0.9), eps 1e-8, weight decay 0.01 on every parameter: torch's
  defaults) after clipping the gradients to a global norm of 1; the learning rate rises from 1e-5
  quadratically over ``warmup_steps`` to the peak, then falls linearly to ``final_learning_rate`` over
  ``decay_steps`` and stays there (``common/schedulers.py``'s ``WarmupLR``);
- each step runs the generator once; the discriminators are updated on its (detached) output first,
  and the generator's losses are then taken through the updated discriminators, as the reference's
  manual optimisation does.

As X-Codec-2.0's, the decoder's four ResNet blocks apply dropout (``dropout``, 0.1) while training;
the masks of step k come from ``fold_in(state.rng, k)``, so a resumed run draws the same ones, and
JAX's partitionable PRNG makes them independent of how the batch is split over devices.

The ``reconstruction`` recipe drops the discriminators and the semantic loss and trains on
``mel_loss + multi_resolution_stft_loss`` (Vocos' log-mel and auraloss' defaults, weights 1 and 1).

Parallelism: one ``"data"`` mesh axis over every device of every process; the batch is split along
it and the parameters and optimiser states are replicated (XLA all-reduces the gradients). The
codec is about 630M parameters, more than half of them the frozen w2v-BERT that holds no optimiser
state, so the whole replicated state is about 6 GB in float32: it fits every accelerator this is
trained on, and replication keeps each step free of parameter gathers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import Xcodec2Config
from ..modeling.layout import PRE_QUANTIZER_MODULES
from ..utils.dtypes import COMPUTE_DTYPES, compute_dtype
from ..utils.validation import int_at_least, positive_int
from .discriminators import MultiPeriodDiscriminator, SpecDiscriminator
from .generator import TRAINING_ONLY, Generator
from .losses import (
    feature_matching_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    mel_loss,
    multi_resolution_mel_loss,
    multi_resolution_stft_loss,
)

RECIPES = ("xcodec2", "reconstruction")
FROZEN_ALWAYS = ("semantic_encoder",)
METRICS = (
    "loss/generator",
    "loss/discriminator",
    "loss/mel",
    "loss/adversarial",
    "loss/feature_matching",
    "loss/semantic",
    "loss/stft",
    "learning_rate",
    "grad_norm/generator",
    "grad_norm/discriminator",
)


def default_trainable(recipe: str) -> tuple[str, ...]:
    """Every generator part but w2v-BERT for ``xcodec2``; the decoder for ``reconstruction``."""
    if recipe == "reconstruction":
        return ("acoustic_decoder",)
    codec = ("semantic_adapter", "acoustic_encoder", "fc_encoder", "quantizer", "acoustic_decoder")
    return codec + TRAINING_ONLY


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of a run; the defaults are X-Codec-2.0's."""

    name: str = "xcodec2"
    learning_rate: float = 1e-4
    initial_learning_rate: float = 1e-5
    final_learning_rate: float = 2e-5
    warmup_steps: int = 3000
    decay_steps: int = 400_000
    betas: tuple[float, float] = (0.8, 0.9)
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    mel_weight: float | None = None  # 15 for xcodec2 (X-Codec-2.0's), 1 for reconstruction (Vocos' L1)
    adversarial_weight: float = 1.0
    feature_matching_weight: float = 1.0
    semantic_weight: float = 5.0
    discriminator_weight: float = 1.0
    stft_weight: float = 1.0
    mpd_channels: int = 16
    spec_channels: int = 32
    trainable: tuple[str, ...] | None = None
    compute_dtype: str = "float32"
    dropout: float = 0.1

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"recipe must be one of {list(RECIPES)}, got {self.name!r}")
        for field in ("learning_rate", "initial_learning_rate", "final_learning_rate", "clip_norm"):
            if not float(getattr(self, field)) > 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)!r}")
        for field in ("mpd_channels", "spec_channels"):
            positive_int(getattr(self, field), field)
        for field in ("warmup_steps", "decay_steps"):
            int_at_least(getattr(self, field), field, 0)
        if not 0 <= float(self.dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        trainable = default_trainable(self.name) if self.trainable is None else tuple(self.trainable)
        if not trainable:
            raise ValueError("trainable names no part: nothing would train")
        frozen_named = [name for name in trainable if name in FROZEN_ALWAYS]
        if frozen_named:
            raise ValueError(f"{frozen_named} is the frozen semantic encoder (w2v-BERT): it does not train")
        if self.mel_weight is None:
            object.__setattr__(self, "mel_weight", 15.0 if self.name == "xcodec2" else 1.0)
        object.__setattr__(self, "trainable", trainable)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def adversarial(self) -> bool:
        return self.name == "xcodec2"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["trainable"] = list(self.trainable)
        data["betas"] = list(self.betas)
        return data


def learning_rate_schedule(recipe: Recipe) -> optax.Schedule:
    """X-Codec-2.0's ``WarmupLR``: the learning rate of optimiser step ``count`` (from 0)."""
    start, peak, end = recipe.initial_learning_rate, recipe.learning_rate, recipe.final_learning_rate
    warmup, decay = recipe.warmup_steps, recipe.decay_steps

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        rising = start + (peak - start) * (s / max(warmup, 1)) ** 2
        falling = peak + (end - peak) * (s - warmup) / max(decay, 1)
        return jnp.where(s < warmup, rising, jnp.where(s < warmup + decay, falling, end))

    return schedule


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the recipe's schedule (torch's AdamW formula)."""
    b1, b2 = recipe.betas
    adamw = optax.adamw(
        learning_rate_schedule(recipe), b1=b1, b2=b2, eps=1e-8, weight_decay=recipe.weight_decay
    )
    return optax.chain(optax.clip_by_global_norm(recipe.clip_norm), adamw)


class Discriminators:
    """The multi-period and spectrogram discriminators as one function of ``{"mpd", "spec"}`` params;
    the first layers' widths are the recipe's (X-Codec-2.0: 16 and 32; smaller ones for quick tests)."""

    def __init__(self, mpd_channels: int = 16, spec_channels: int = 32):
        self.mpd = MultiPeriodDiscriminator(channels=mpd_channels)
        self.spec = SpecDiscriminator(channels=spec_channels)

    def init(self, key: jax.Array, samples: int) -> dict:
        audio = jnp.zeros((1, samples), jnp.float32)
        k1, k2 = jax.random.split(key)
        return {
            "mpd": jax.jit(self.mpd.init)(k1, audio)["params"],
            "spec": jax.jit(self.spec.init)(k2, audio)["params"],
        }

    def __call__(self, params: Mapping[str, Any], audio: jnp.ndarray) -> list:
        """Per sub-discriminator (5 periods, then 8 resolutions), its layer outputs, logits last."""
        return self.mpd.apply({"params": params["mpd"]}, audio) + self.spec.apply(
            {"params": params["spec"]}, audio
        )

    def pair(self, params: Mapping[str, Any], first: jnp.ndarray, second: jnp.ndarray) -> tuple[list, list]:
        """:meth:`__call__` of two equal-shaped batches as one batch (one trace, wider convolutions);
        the items are independent, so each half is what it would be alone."""
        outputs = self(params, jnp.concatenate([first, second]))
        b = first.shape[0]
        return (
            [[x[:b] for x in layers] for layers in outputs],
            [[x[b:] for x in layers] for layers in outputs],
        )


@flax.struct.dataclass
class GanState:
    """What a step updates: ``step`` (int32, steps done), the trainable generator parameters and the
    discriminators' (an empty dict for the reconstruction recipe), and their optimiser states.
    ``rng`` (uint32 (2,), the run's raw PRNG key) seeds the dropout of every step."""

    step: jnp.ndarray
    rng: jnp.ndarray
    generator: Any
    generator_opt: Any
    discriminator: Any
    discriminator_opt: Any


def split_params(params: Mapping[str, Any], trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) parts of a generator tree, by top-level name."""
    unknown = [name for name in trainable if name not in params]
    if unknown:
        raise ValueError(f"no such part(s) {unknown} in the generator; choose from {sorted(params)}")
    return (
        {k: v for k, v in params.items() if k in trainable},
        {k: v for k, v in params.items() if k not in trainable},
    )


def make_mesh(devices=None) -> Mesh:
    """A one-axis ``"data"`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


class RecipeTrainer:
    """The jitted step of a recipe for one model config on one mesh.

    ``step(state, frozen, audio)`` takes this process's rows of the global (B, T) float32 batch (T a
    multiple of the hop) and returns ``(state, metrics)`` with :data:`METRICS` (zeros for losses the
    recipe does not have); ``state`` is donated.
    """

    def __init__(self, config: Xcodec2Config, recipe: Recipe, devices=None):
        self.config = config
        self.recipe = recipe
        self.mesh = make_mesh(devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.generator = Generator(config, compute_dtype(recipe.compute_dtype), recipe.dropout)
        self.discriminators = Discriminators(recipe.mpd_channels, recipe.spec_channels)
        self.generator_optimizer = make_optimizer(recipe)
        self.discriminator_optimizer = make_optimizer(recipe)
        self.schedule = learning_rate_schedule(recipe)
        # The semantic loss reaches the training-only parts and everything before the quantizer.
        reached = TRAINING_ONLY + PRE_QUANTIZER_MODULES
        self.semantic = recipe.adversarial and any(name in reached for name in recipe.trainable)
        self._step = jax.jit(
            self.train_step,
            in_shardings=(self.replicated, self.replicated, self.data_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def _init(self, generator: Mapping[str, Any], discriminator: Mapping[str, Any], seed) -> tuple:
        trainable, frozen = split_params(generator, self.recipe.trainable)
        state = GanState(
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.PRNGKey(seed),
            generator=trainable,
            generator_opt=self.generator_optimizer.init(trainable),
            discriminator=dict(discriminator),
            discriminator_opt=self.discriminator_optimizer.init(dict(discriminator)),
        )
        return state, frozen

    def init_state(
        self, generator: Mapping[str, Any], discriminator: Mapping[str, Any], seed: int = 0
    ) -> tuple[GanState, dict]:
        """(state at step 0, frozen generator parts), replicated on the mesh; ``seed`` seeds dropout."""
        init = jax.jit(self._init, out_shardings=self.replicated)
        return init(generator, discriminator, jnp.uint32(seed))

    def frozen(self, generator: Mapping[str, Any]) -> dict:
        """The generator's frozen parts, replicated on the mesh (what a resumed run needs beside the
        restored state)."""
        _, frozen = split_params(generator, self.recipe.trainable)
        return jax.jit(lambda tree: tree, out_shardings=self.replicated)(frozen)

    def abstract_state(self, generator: Mapping[str, Any], discriminator: Mapping[str, Any]) -> GanState:
        """Shapes, dtypes and shardings of :meth:`init_state`'s state, to restore a checkpoint into.
        The arguments may be arrays or ``jax.ShapeDtypeStruct`` trees."""
        state, _ = jax.eval_shape(self._init, generator, discriminator, jnp.uint32(0))
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), state)

    def _generator_losses(self, disc_params, audio, recon, semantic, target):
        """(total, parts) of the generator's loss as a function of its outputs."""
        r = self.recipe
        zero = jnp.float32(0.0)
        if not r.adversarial:
            mel, stft = mel_loss(recon, audio), multi_resolution_stft_loss(recon, audio)
            parts = {"loss/mel": mel, "loss/stft": stft}
            return r.mel_weight * mel + r.stft_weight * stft, parts
        mel = multi_resolution_mel_loss(recon, audio)
        fake, real = self.discriminators.pair(disc_params, recon, audio)
        real = jax.lax.stop_gradient(real)
        adversarial = lsgan_generator_loss(fake)
        matching = feature_matching_loss(real, fake)
        sem = jnp.mean((semantic - target) ** 2) if self.semantic else zero
        total = (
            r.mel_weight * mel
            + r.adversarial_weight * adversarial
            + r.feature_matching_weight * matching
            + r.semantic_weight * sem
        )
        parts = {"loss/mel": mel, "loss/adversarial": adversarial, "loss/feature_matching": matching}
        return total, {**parts, "loss/semantic": sem}

    def _discriminator_step(self, state: GanState, audio, recon):
        """(discriminator params, optimiser state, loss, grad norm) after one update on ``recon``."""
        fake = jax.lax.stop_gradient(recon)

        def loss_fn(params):
            real_out, fake_out = self.discriminators.pair(params, audio, fake)
            return self.recipe.discriminator_weight * lsgan_discriminator_loss(real_out, fake_out)

        loss, grads = jax.value_and_grad(loss_fn)(state.discriminator)
        updates, opt = self.discriminator_optimizer.update(
            grads, state.discriminator_opt, state.discriminator
        )
        return optax.apply_updates(state.discriminator, updates), opt, loss, optax.tree.norm(grads)

    def train_step(self, state: GanState, frozen, audio):
        """One step on the global (B, T) batch, unjitted (what :meth:`step` runs jitted and sharded)."""

        key = jax.random.fold_in(state.rng, state.step) if self.recipe.dropout > 0 else None

        def forward(trainable):
            params = {**frozen, **trainable}
            out = self.generator(params, audio, with_semantic=self.semantic, dropout_key=key)
            return (out.audio, out.semantic), out.semantic_target

        (recon, semantic), pullback, target = jax.vjp(forward, state.generator, has_aux=True)
        zero = jnp.float32(0.0)
        disc, disc_opt, disc_loss, disc_norm = state.discriminator, state.discriminator_opt, zero, zero
        if self.recipe.adversarial:
            disc, disc_opt, disc_loss, disc_norm = self._discriminator_step(state, audio, recon)
        (total, parts), output_grads = jax.value_and_grad(
            lambda r, s: self._generator_losses(disc, audio, r, s, target), argnums=(0, 1), has_aux=True
        )(recon, semantic)
        (grads,) = pullback(output_grads)
        updates, gen_opt = self.generator_optimizer.update(grads, state.generator_opt, state.generator)
        metrics = {name: zero for name in METRICS}
        metrics.update(parts)
        metrics.update(
            {
                "loss/generator": total,
                "loss/discriminator": disc_loss,
                "learning_rate": self.schedule(state.step),
                "grad_norm/generator": optax.tree.norm(grads),
                "grad_norm/discriminator": disc_norm,
            }
        )
        generator = optax.apply_updates(state.generator, updates)
        new = GanState(state.step + 1, state.rng, generator, gen_opt, disc, disc_opt)
        return new, metrics

    def global_batch(self, rows: np.ndarray) -> jax.Array:
        """This process's rows of the batch as one global array sharded along ``"data"``."""
        rows = np.asarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] % self.config.hop_length:
            raise ValueError(
                f"audio must be (batch, samples) with samples a multiple of {self.config.hop_length}, "
                f"got {rows.shape}"
            )
        return jax.make_array_from_process_local_data(self.data_sharding, rows)

    def compile(self, state: GanState, frozen, batch: jax.Array):
        """The step compiled ahead of time for these arguments (what benchmarks time and measure)."""
        return self._step.lower(state, frozen, batch).compile()

    def step(self, state: GanState, frozen, rows: np.ndarray) -> tuple[GanState, dict]:
        batch = self.global_batch(rows)
        if batch.shape[0] % self.num_devices:
            raise ValueError(
                f"batch size {batch.shape[0]} is not a multiple of the {self.num_devices} devices"
            )
        return self._step(state, frozen, batch)
