"""A training step: xcodec2_jax's ``RecipeTrainer`` vs the same step in PyTorch, alternating rounds.

``--recipe xcodec2`` (the default) is X-Codec2's whole GAN step: the generator once, then an AdamW step
of the multi-period and spectrogram discriminators on its output, then one of everything but w2v-BERT
on 15 · mel + adversarial + feature matching + 5 · semantic; the torch side is
``benchmarks/torch_recipe.py`` (X-Codec-2.0's ``training_step`` on transformers' modules, kan-bayashi's
multi-period discriminator from the pinned ``parallel-wavegan`` release, fetched as the tests do). The
torch step gets its semantic features computed beforehand; ours computes them inside the step. Neither
applies dropout (transformers' decoder has none). ``--dtype bfloat16`` runs ours with bfloat16 compute
(float32 master weights and islands) and torch under ``torch.autocast("cpu", torch.bfloat16)``.

``--recipe reconstruction`` is the decoder's fine-tuning step (frozen encoder, log-mel + multi-resolution
STFT loss); its torch side computes features with our numpy extractor and the mel loss with
``torch.stft`` and transformers' mel filter bank, as ``tests/training/test_losses.py`` checks ours against.
Its codes come from inference's ``encode`` (the extractor's padding), ours from the training forward
(the crop itself, features of the crop padded by half a hop), so the first losses differ slightly
(3.5e-4 relative on the tiny config).

The two are warmed up (JAX: compiled ahead of time, compile time reported), then timed in
alternating rounds. Memory: JAX, XLA's buffer assignment of the compiled step (arguments, i.e. the
weights, optimizer states and batch, + temporaries + outputs − donated); torch, the tensor storages
alive at once during a step (``measure``'s dispatch-mode tracker, backward included) plus the
weights, gradients and optimizer states the step touches.

Both frameworks hold the full model, their optimiser states and a step's temporaries in one process:
at 4 x 2 s that passes 24 GiB (XLA plans 13.9 GB for our float32 step alone), so the default batch is
1 x 2 s, which peaks at about 22 GB of RSS.

    python -m benchmarks.bench_train                       # full config, xcodec2 recipe, 1 x 2 s, 3 rounds
    python -m benchmarks.bench_train --dtype bfloat16
    python -m benchmarks.bench_train --recipe reconstruction
    python -m benchmarks.bench_train --config tiny --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from . import measure
from .bench_codec import TINY_CONFIG, make_batch, speech_loop, spread_weights_

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see README: spinning OpenMP threads on a shared CPU
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_train.jsonl")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
LR = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("full", "tiny"), default="full")
    p.add_argument("--recipe", choices=("xcodec2", "reconstruction"), default="xcodec2")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=1, help="items of --seconds (default 1: see the docstring)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs both steps once)")
    p.add_argument("--out", default=OUT)
    return p.parse_args(argv)


def torch_reconstruction_step(model, audio: np.ndarray):
    """The torch fine-tuning step on ``audio`` (B, T) as (closure returning the loss, optimizers)."""
    import torch
    from auraloss.freq import MultiResolutionSTFTLoss
    from transformers.audio_utils import mel_filter_bank

    from xcodec2_jax.modeling.features import Xcodec2FeatureExtractor

    for p in model.parameters():
        p.requires_grad_(False)
    decoder = [p for p in model.acoustic_decoder.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=LR, betas=(0.8, 0.9), weight_decay=0.01)
    mrstft = MultiResolutionSTFTLoss()
    fb = torch.from_numpy(mel_filter_bank(513, 100, 0.0, 8000.0, 16000, norm=None, mel_scale="htk")).float()
    window = torch.hann_window(1024)
    extractor = Xcodec2FeatureExtractor()
    target = torch.from_numpy(audio)

    def log_mel(a):
        spec = torch.stft(a, 1024, 256, window=window, center=True, pad_mode="reflect", return_complex=True)
        return torch.log(torch.clamp(torch.einsum("bft,fm->bmt", spec.abs(), fb), min=1e-7))

    def step():
        inputs = {k: torch.from_numpy(v) for k, v in extractor(list(audio)).items()}
        with torch.no_grad():
            codes = model.encode(
                inputs["input_values"], inputs["input_features"], inputs["padding_mask"]
            ).audio_codes
        recon = model.decode(codes).audio_values[:, 0, : audio.shape[1]]
        loss = torch.nn.functional.l1_loss(log_mel(recon), log_mel(target))
        loss = loss + mrstft(recon[:, None], target[:, None])
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        return loss.item()

    return step, [optimizer]


def torch_recipe_step(model, config, audio: np.ndarray, features: np.ndarray, dtype: str):
    """X-Codec2's GAN step in torch (``torch_recipe.RecipeStep``) as (closure returning the generator
    loss, optimizers), and our generator and discriminator parameters from the same weights."""
    import torch

    from xcodec2_jax.training.discriminators import params_from_torch

    from .torch_recipe import RecipeStep, heads_params, training_modules

    sys.path.insert(0, TESTS)  # the pinned parallel-wavegan release, fetched as the tests do
    from parallel_wavegan_release import hifigan_module

    heads, mpd, spec = training_modules(config, hifigan_module().HiFiGANMultiPeriodDiscriminator)
    discriminators = {
        "mpd": params_from_torch(mpd.state_dict())["params"],
        "spec": params_from_torch(spec.state_dict())["params"],
    }
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    step = RecipeStep(model, heads, mpd, spec, LR, autocast=autocast)
    optimizers = [step.generator_opt, step.discriminator_opt]
    return (lambda: step(audio, features)["loss/generator"]), optimizers, heads_params(*heads), discriminators


def _optimizer_tensors(optimizers) -> list:
    import torch

    tensors = []
    for opt in optimizers:
        for group in opt.param_groups:
            tensors += [p for p in group["params"]] + [p.grad for p in group["params"] if p.grad is not None]
        tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return tensors


# long: set-up of both sides, warm-up and memory, then the alternating rounds and the rows
def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import torch
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    from xcodec2_jax import load_checkpoint
    from xcodec2_jax.modeling.features import fbank_features_jax
    from xcodec2_jax.training.recipe import Recipe, RecipeTrainer

    torch.set_num_threads(os.cpu_count())
    loop = speech_loop()[0]
    audio = np.stack(make_batch(loop, args.seconds, args.batch))
    torch.manual_seed(0)
    model = TorchModel(TorchConfig(**(TINY_CONFIG if args.config == "tiny" else {}))).eval()
    spread_weights_(model, loop[: 2 * 16000], 0)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config, params = load_checkpoint(tmp)
    audio = audio[:, : audio.shape[1] // config.hop_length * config.hop_length]

    recipe = Recipe(
        args.recipe, learning_rate=LR, initial_learning_rate=LR, warmup_steps=0, dropout=0.0,
        compute_dtype=args.dtype,
    )  # fmt: skip
    discriminators = {}
    if args.recipe == "xcodec2":
        lengths = np.full((len(audio),), audio.shape[1], np.int32)
        features = np.asarray(fbank_features_jax(audio, lengths, hop_length=config.hop_length)[0])
        made = torch_recipe_step(model, config, audio, features, args.dtype)
        torch_step, optimizers, heads, discriminators = made
        params = {**params, **heads}
    else:
        if args.dtype != "float32":
            raise SystemExit("--recipe reconstruction is benchmarked in float32 only")
        torch_step, optimizers = torch_reconstruction_step(model, audio)
    trainer = RecipeTrainer(config, recipe)
    state, frozen = trainer.init_state(params, discriminators)
    del params, discriminators
    batch = trainer.global_batch(audio)
    start = time.perf_counter()
    compiled = trainer.compile(state, frozen, batch)
    compile_s = time.perf_counter() - start
    jax_peak, jax_work = measure.jax_memory(compiled)
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return float(metrics["loss/generator"])

    start = time.perf_counter()
    jax_losses = [jax_step()]
    jax_first = time.perf_counter() - start

    start = time.perf_counter()
    torch_losses = [torch_step()]  # creates the optimizer states and gradients
    torch_first = time.perf_counter() - start
    external = [*model.parameters(), *_optimizer_tensors(optimizers)]
    tracker = measure.tensor_memory_tracker_cls()(external)
    with tracker:
        torch_losses.append(torch_step())
    torch_peak = (tracker.used_external_bytes + tracker.peak) / measure.MB
    jax_losses.append(jax_step())

    times = {"jax": [], "torch": []}
    calls = {"jax": jax_step, "torch": torch_step}
    load_start = measure.loadavg()
    for r in range(args.rounds):
        for name in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
            start = time.perf_counter()
            (jax_losses if name == "jax" else torch_losses).append(calls[name]())
            times[name].append(time.perf_counter() - start)
    load_end = measure.loadavg()

    base = dict(
        run_id=measure.run_id(),
        git=measure.git_state(),
        command="python -m benchmarks.bench_train " + " ".join(argv if argv is not None else sys.argv[1:]),
        config=args.config,
        recipe=args.recipe,
        dtype=args.dtype,
        batch=args.batch,
        seconds=args.seconds,
        stage="train_step",
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        loadavg_start=load_start,
        loadavg_end=load_end,
    )
    rows = []
    for name, first, peak, work, losses in (
        ("jax", jax_first, jax_peak, jax_work, jax_losses),
        ("torch", torch_first, torch_peak, tracker.peak / measure.MB, torch_losses),
    ):
        med = statistics.median(times[name])
        rows.append(
            dict(
                base,
                impl=name,
                compile_s=compile_s if name == "jax" else None,
                first_run_s=first,
                times_s=[round(t, 4) for t in times[name]],
                median_s=med,
                steps_per_s=1.0 / med,
                peak_mem_mb=peak,
                work_mem_mb=work,
                losses=[round(x, 5) for x in losses],
            )
        )
    rows[0]["speedup_vs_torch"] = rows[1]["median_s"] / rows[0]["median_s"]
    # Both first losses come from the same weights and batch.
    rows[0]["first_loss_rel_diff_vs_torch"] = abs(jax_losses[0] - torch_losses[0]) / abs(torch_losses[0])
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(
            f"{row['impl']:6s} {row['steps_per_s']:.3f} steps/s (median {row['median_s']:.3f} s of "
            f"{row['times_s']}), peak {row['peak_mem_mb']:.0f} MB, first step {row['first_run_s']:.1f} s, "
            f"losses {row['losses'][:3]}",
            file=sys.stderr,
        )
    print(f"speedup {rows[0]['speedup_vs_torch']:.2f}x, JAX compile {compile_s:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
