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

By default both frameworks hold the full model, their optimiser states and a step's temporaries in
one process: at 4 x 2 s that passes 24 GiB (XLA plans 13.9 GB for our float32 step alone), so the
default batch is 1 x 2 s, which peaks at about 22 GB of RSS. ``--isolate`` runs each round as one fresh
process per framework (the first alternating), each building the same weights and batch, warming up
(compiling) and timing ``--reps`` steps: one framework in memory at a time, for the issue's 4 x 2 s.

    python -m benchmarks.bench_train                       # full config, xcodec2 recipe, 1 x 2 s, 3 rounds
    python -m benchmarks.bench_train --batch 4 --isolate --rounds 2 --reps 2
    python -m benchmarks.bench_train --dtype bfloat16
    python -m benchmarks.bench_train --recipe reconstruction
    python -m benchmarks.bench_train --config tiny --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import measure
from .bench_codec import TINY_CONFIG, make_batch, speech_loop, spread_weights_

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see README: spinning OpenMP threads on a shared CPU
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_train.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
LR = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("full", "tiny"), default="full")
    p.add_argument("--recipe", choices=("xcodec2", "reconstruction"), default="xcodec2")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=1, help="items of --seconds (default 1: see the docstring)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs both steps once)")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="each round runs one fresh process per framework (for batches whose two models pass memory)",
    )
    p.add_argument("--reps", type=int, default=2, help="timed steps per worker process (--isolate)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
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


def build(args) -> dict:
    """The batch, the torch model and step (its optimizers, the module), and our config, generator and
    discriminator parameters made from the same weights."""
    import torch
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    from xcodec2_jax import load_checkpoint
    from xcodec2_jax.modeling.features import fbank_features_jax

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
    discriminators = {}
    if args.recipe == "xcodec2":
        lengths = np.full((len(audio),), audio.shape[1], np.int32)
        features = np.asarray(fbank_features_jax(audio, lengths, hop_length=config.hop_length)[0])
        torch_step, optimizers, heads, discriminators = torch_recipe_step(
            model, config, audio, features, args.dtype
        )
        params = {**params, **heads}
    else:
        if args.dtype != "float32":
            raise SystemExit("--recipe reconstruction is benchmarked in float32 only")
        torch_step, optimizers = torch_reconstruction_step(model, audio)
    return dict(
        audio=audio, model=model, torch_step=torch_step, optimizers=optimizers,
        config=config, params=params, discriminators=discriminators,
    )  # fmt: skip


def jax_side(args, built: dict) -> dict:
    """Our step compiled ahead of time and run once: its call, compile time, memory and first loss."""
    from xcodec2_jax.training.recipe import Recipe, RecipeTrainer

    recipe = Recipe(
        args.recipe, learning_rate=LR, initial_learning_rate=LR, warmup_steps=0, dropout=0.0,
        compute_dtype=args.dtype,
    )  # fmt: skip
    trainer = RecipeTrainer(built["config"], recipe)
    state, frozen = trainer.init_state(built.pop("params"), built.pop("discriminators"))
    batch = trainer.global_batch(built["audio"])
    start = time.perf_counter()
    compiled = trainer.compile(state, frozen, batch)
    compile_s = time.perf_counter() - start
    peak, work = measure.jax_memory(compiled)
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return float(metrics["loss/generator"])

    start = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - start
    return dict(
        call=step, compile_s=compile_s, first_run_s=first, peak_mem_mb=peak, work_mem_mb=work, losses=losses
    )


def torch_side(built: dict) -> dict:
    """The torch step run twice (the first creates gradients and optimizer states; the second is
    tracked for memory): its call, memory and first losses."""
    step = built["torch_step"]
    start = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - start
    external = [*built["model"].parameters(), *_optimizer_tensors(built["optimizers"])]
    tracker = measure.tensor_memory_tracker_cls()(external)
    with tracker:
        losses.append(step())
    peak = (tracker.used_external_bytes + tracker.peak) / measure.MB
    return dict(
        call=step,
        compile_s=None,
        first_run_s=first,
        peak_mem_mb=peak,
        work_mem_mb=tracker.peak / measure.MB,
        losses=losses,
    )


def side(args, built: dict, impl: str) -> dict:
    """``impl``'s side; in a worker the other framework's objects are dropped first, so that the
    process holds one model's step only."""
    if impl == "jax":
        for key in ("model", "torch_step", "optimizers"):
            built.pop(key)
        gc.collect()
        return jax_side(args, built)
    built.pop("params")
    gc.collect()
    return torch_side(built)


def run_worker(args) -> int:
    """One framework's side in this process: warm-up, then ``--reps`` timed steps, as one JSON line."""
    built = build(args)
    result = side(args, built, args.worker)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        result["losses"].append(result["call"]())
        times.append(time.perf_counter() - start)
    result.pop("call")
    print("RESULT" + json.dumps(dict(result, times_s=times)), flush=True)
    return 0


def isolated_rounds(args, argv: list[str]) -> dict[str, dict]:
    """Each round runs a fresh worker process per framework, the first one alternating: only one
    framework's model and step are in memory at a time (both at once pass 24 GiB at 4 x 2 s)."""
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for impl in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
            command = [sys.executable, "-m", "benchmarks.bench_train", *argv, "--worker", impl]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"{impl} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
            got = json.loads(line[len("RESULT") :])
            print(f"round {r} {impl}: {got['times_s']}", file=sys.stderr, flush=True)
            if impl in results:
                results[impl]["times_s"] += got["times_s"]
                results[impl]["peak_mem_mb"] = max(results[impl]["peak_mem_mb"], got["peak_mem_mb"])
            else:
                results[impl] = got
    return results


def _worker_argv(argv: list[str]) -> list[str]:
    """The driver's arguments without ``--isolate`` and ``--out`` (workers print, the driver writes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a != "--isolate" and not a.startswith("--out="):
            out.append(a)
    return out


def in_process_rounds(args) -> dict[str, dict]:
    """Both frameworks in this process, timed in alternating rounds."""
    built = build(args)
    results = {"jax": jax_side(args, built), "torch": torch_side(built)}
    results["jax"]["losses"].append(results["jax"]["call"]())
    for result in results.values():
        result["times_s"] = []
    for r in range(args.rounds):
        for name in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
            start = time.perf_counter()
            results[name]["losses"].append(results[name]["call"]())
            results[name]["times_s"].append(time.perf_counter() - start)
    for result in results.values():
        result.pop("call")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.worker:
        return run_worker(args)
    import jax
    import torch

    load_start = measure.loadavg()
    if args.isolate:
        results = isolated_rounds(args, _worker_argv(argv))
    else:
        results = in_process_rounds(args)
    base = dict(
        run_id=measure.run_id(),
        git=measure.git_state(),
        command="python -m benchmarks.bench_train " + " ".join(argv),
        config=args.config,
        recipe=args.recipe,
        dtype=args.dtype,
        batch=args.batch,
        seconds=args.seconds,
        stage="train_step",
        isolated=args.isolate,
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        torch=torch.__version__,
        torch_threads=os.cpu_count(),
        loadavg_start=load_start,
        loadavg_end=measure.loadavg(),
    )
    rows = []
    for name in ("jax", "torch"):
        got = results[name]
        med = statistics.median(got["times_s"])
        rows.append(
            dict(
                base,
                impl=name,
                compile_s=got["compile_s"],
                first_run_s=got["first_run_s"],
                times_s=[round(t, 4) for t in got["times_s"]],
                median_s=med,
                steps_per_s=1.0 / med,
                peak_mem_mb=got["peak_mem_mb"],
                work_mem_mb=got["work_mem_mb"],
                losses=[round(x, 5) for x in got["losses"]],
            )
        )
    rows[0]["speedup_vs_torch"] = rows[1]["median_s"] / rows[0]["median_s"]
    # Both first losses come from the same weights and batch.
    first_jax, first_torch = results["jax"]["losses"][0], results["torch"]["losses"][0]
    rows[0]["first_loss_rel_diff_vs_torch"] = abs(first_jax - first_torch) / abs(first_torch)
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
    print(
        f"speedup {rows[0]['speedup_vs_torch']:.2f}x, JAX compile {rows[0]['compile_s']:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
