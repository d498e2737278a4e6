"""Training runs (``train`` / ``xcodec2-jax train``): the loss falls, the output loads and exports, a
killed run resumes to the same losses bit for bit, two hosts of two devices train as one device does,
and bad settings and data are refused clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import QUICK_RECIPE, TINY_CONFIG, _make_reference, load_speech

from xcodec2_jax.cli import main

STEPS, SAVE_EVERY, SAMPLE_EVERY = 24, 8, 12
CLI_ARGS = [
    "--batch-size", "2", "--segment-seconds", "0.5", "--learning-rate", "1e-3",
    "--initial-learning-rate", "1e-3", "--discriminator-channels", "4,8", "--dropout", "0",
    "--save-every", str(SAVE_EVERY), "--no-tensorboard",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    return _make_reference(tmp_path_factory, "tiny", TINY_CONFIG)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 0.6 s clip of speech (crops of 0.5 s start in its first 0.1 s) and a broken file."""
    path = tmp_path_factory.mktemp("train_data")
    sf.write(path / "clip.wav", load_speech()[0][8000:17600], 16000)
    (path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return path


def _recipe(**overrides):
    from xcodec2_jax.training.recipe import Recipe

    return Recipe(**{**QUICK_RECIPE, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tiny_ref, data_dir, tmp_path_factory):
    from xcodec2_jax.training.run import train

    out = tmp_path_factory.mktemp("train_full")
    log = train(
        str(data_dir), str(out), recipe=_recipe(), model=tiny_ref.path, steps=STEPS, batch_size=2,
        segment_seconds=0.5, save_every=SAVE_EVERY, sample_every=SAMPLE_EVERY, progress=False,
        tensorboard=True,
    )  # fmt: skip
    return out, log


def _log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
    return entries


def _events(folder) -> list:
    """Every event of the TensorBoard files in ``folder`` (TFRecord framing: length, CRC, data, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith("events.out.tfevents."):
            continue
        data = (folder / name).read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def _mel_distance(codec, audio) -> float:
    from xcodec2_jax.training.losses import multi_resolution_mel_loss

    recon = codec.decode(codec.encode(audio, 16000))[0]
    return float(multi_resolution_mel_loss(recon[None, : len(audio)], audio[None]))


@pytest.mark.slow
def test_run_logs_falls_and_its_output_loads(uninterrupted, tiny_ref):
    from xcodec2_jax import Xcodec2Codec, load_params
    from xcodec2_jax.training.recipe import METRICS
    from xcodec2_jax.utils.tree import flatten

    out, log = uninterrupted
    entries = _log(out)
    assert entries == log and len(entries) == STEPS
    assert set(entries[0]) == {"step", *METRICS, "steps_per_second", "seconds"}
    assert all(np.isfinite(e[k]) for e in entries for k in METRICS)
    assert all(e["learning_rate"] == pytest.approx(1e-3) for e in entries)
    mel = [e["loss/mel"] for e in entries]
    assert np.mean(mel[-8:]) < np.mean(mel[:8]), mel
    assert all(e["loss/discriminator"] > 0 and e["loss/semantic"] > 0 for e in entries)

    # What the run leaves: samples, errors, settings, the model and its training-only parts.
    assert sorted(os.listdir(out / "samples")) == ["reference.wav", "step_00000012.wav", "step_00000024.wav"]
    sample, rate = sf.read(out / "samples" / "step_00000024.wav")
    assert rate == 16000 and sample.shape == (8000,) and np.abs(sample).max() > 0
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["id"] == "broken.wav" and "cannot read audio" in error["error"]
    assert json.loads((out / "train.json").read_text())["recipe"]["mpd_channels"] == 4
    assert (out / "training_parts").is_dir()

    # TensorBoard: every logged metric per step, and the samples as audio.
    values = [v for e in _events(out) for v in e.summary.value]
    mel_points = [v.simple_value for v in values if v.tag == "loss/mel"]
    np.testing.assert_allclose(mel_points, mel, rtol=1e-6)
    assert {v.tag for v in values} >= {
        "loss/discriminator",
        "learning_rate",
        "samples/step",
        "samples/reference",
    }
    assert all(v.audio.sample_rate == 16000 for v in values if v.tag.startswith("samples/"))

    # w2v-BERT stayed frozen; everything else trained.
    trained, original = flatten(load_params(str(out))), flatten(tiny_ref.params)
    assert trained.keys() == original.keys()
    for path, value in original.items():
        same = np.array_equal(trained[path], value)
        assert same if path[0] == "semantic_encoder" else True, path
    assert not all(np.array_equal(trained[p], v) for p, v in original.items() if p[0] == "acoustic_encoder")
    assert not all(np.array_equal(trained[p], v) for p, v in original.items() if p[0] == "acoustic_decoder")

    # The trained codec reconstructs its training speech better than the initial one.
    clip = load_speech()[0][8000:17600]
    before = _mel_distance(Xcodec2Codec.from_pretrained(tiny_ref.path), clip)
    after = _mel_distance(Xcodec2Codec.from_pretrained(str(out)), clip)
    assert after < before, (before, after)


@pytest.mark.slow
def test_export_loads_in_transformers_without_missing_keys(uninterrupted, tmp_path):
    import torch
    from transformers import Xcodec2Model as TorchModel

    from xcodec2_jax import Xcodec2Codec

    out = uninterrupted[0]
    assert main(["export", str(out), "-o", str(tmp_path / "hf")]) == 0
    model, info = TorchModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # transformers' feature-extractor loader (short of the class, which needs torchaudio) reads the settings.
    from transformers import FeatureExtractionMixin

    settings, _ = FeatureExtractionMixin.get_feature_extractor_dict(str(tmp_path / "hf"))
    assert settings["feature_extractor_type"] == "Xcodec2FeatureExtractor" and settings["hop_length"] == 320
    codec = Xcodec2Codec.from_pretrained(str(out))
    codes = codec.encode(load_speech()[2][:16000], 16000)
    with torch.no_grad():
        ref = model.eval().decode(torch.from_numpy(np.asarray(codes.codes)[:, None, :]).long()).audio_values
    ours = codec.decode(codes)[0]
    ref = ref[0, 0].numpy()
    assert np.abs(ours[: len(ref)] - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_rerun_with_another_recipe_is_refused(uninterrupted, data_dir, tiny_ref, capsys):
    out = uninterrupted[0]
    argv = ["train", str(data_dir), "-o", str(out), "--model", tiny_ref.path, "--steps", "1", *CLI_ARGS]
    argv[argv.index("--learning-rate") + 1] = "5e-4"
    assert main(argv) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_finished_gan_run_extends_from_its_checkpoint(uninterrupted, data_dir, tiny_ref, tmp_path):
    """The GAN recipe's resume (generator, discriminators and both optimiser states restored): a
    finished run given more steps continues from its last checkpoint and keeps its log."""
    import shutil

    from xcodec2_jax.training.run import train

    out = tmp_path / "extended"
    shutil.copytree(uninterrupted[0], out)
    log = train(
        str(data_dir), str(out), recipe=_recipe(), model=tiny_ref.path, steps=STEPS + 1, batch_size=2,
        segment_seconds=0.5, save_every=SAVE_EVERY, progress=False, tensorboard=False,
    )  # fmt: skip
    assert log[:STEPS] == uninterrupted[1] and [e["step"] for e in log] == list(range(1, STEPS + 2))
    assert np.isfinite(log[-1]["loss/discriminator"]) and log[-1]["loss/discriminator"] > 0
    assert sorted(os.listdir(out / "checkpoints"))[-1] == str(STEPS + 1)


def test_no_usable_audio_is_one_clear_error(tmp_path, capsys, tiny_ref):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), "-o", str(tmp_path / "o"), "--model", tiny_ref.path]) == 2
    assert "no Parquet files, no tar shards and no files ending in" in capsys.readouterr().err

    (empty / "bad.flac").write_bytes(b"\0" * 100)
    assert main(["finetune", str(empty), "-o", str(tmp_path / "o"), "--model", tiny_ref.path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert any("bad.flac: skipped: cannot read audio" in line for line in err)
    assert "no usable audio: none of the 1 item(s) could be read" in err[-1]
    assert main(["train", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_recipe_and_run_settings_are_checked(tmp_path, capsys):
    from xcodec2_jax.training.recipe import Recipe, learning_rate_schedule, split_params

    with pytest.raises(ValueError, match="recipe must be one of"):
        Recipe(name="gan")
    with pytest.raises(ValueError, match="frozen semantic encoder"):
        Recipe(trainable=("semantic_encoder",))
    with pytest.raises(ValueError, match="mpd_channels"):
        Recipe(mpd_channels=0)
    with pytest.raises(ValueError, match="no such part"):
        split_params({"acoustic_decoder": {}}, ("decoder",))
    assert Recipe("reconstruction").trainable == ("acoustic_decoder",)
    # finetune's loss is log-mel + multi-resolution STFT, 1:1; X-Codec2's mel weight is 15.
    assert (Recipe("reconstruction").mel_weight, Recipe("reconstruction").stft_weight) == (1.0, 1.0)
    assert Recipe().mel_weight == 15.0 and Recipe(mel_weight=45).mel_weight == 45
    assert "fc_post_s" in Recipe().trainable and "semantic_encoder" not in Recipe().trainable
    # X-Codec-2.0's WarmupLR: 1e-5 at step 0, quadratic to 1e-4 at 3000, linear to 2e-5 at 403000.
    lr = learning_rate_schedule(Recipe())
    expected = {0: 1e-5, 1500: 1e-5 + 9e-5 / 4, 3000: 1e-4, 203000: 6e-5, 403000: 2e-5, 10**6: 2e-5}
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-6), step
    assert main(["train", str(tmp_path), "-o", str(tmp_path / "o"), "--config", "small"]) == 2
    err = capsys.readouterr().err
    assert "no Parquet files" in err or "needs semantic_model" in err
    argv = ["train", str(tmp_path), "-o", str(tmp_path / "o"), "--loss-weights", '{"mel": 1}']
    assert main(argv) == 2
    assert "--loss-weights takes a JSON object with keys among" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FINETUNE_STEPS, FINETUNE_LR = 6, 1e-5  # a small learning rate: Adam's first steps are lr · sign(g), and
# float noise flips the sign where g ~ 0, so larger steps would part runs on other devices for no bug.


@pytest.fixture(scope="module")
def finetune_run(tiny_ref, tmp_path_factory):
    """``finetune`` (the reconstruction recipe, with the decoder's dropout) on one device, in this
    process: (its argv without ``-o``, OUT)."""
    data = tmp_path_factory.mktemp("finetune_data")
    for i, clip in enumerate(load_speech()):
        sf.write(data / f"clip{i}.wav", clip[:16000], 16000)
    argv = ["finetune", str(data), "--model", tiny_ref.path, "--steps", str(FINETUNE_STEPS)]
    argv += ["--batch-size", "4", "--segment-seconds", "0.2", "--learning-rate", str(FINETUNE_LR)]
    argv += ["--save-every", "2", "--no-tensorboard", "--dropout", "0.1"]
    out = tmp_path_factory.mktemp("finetune_one")
    assert main([*argv, "-o", str(out)]) == 0
    return argv, out


def _losses(out, kinds=("loss/", "grad_norm/", "learning_rate")) -> np.ndarray:
    """(steps, metrics): every loss, grad norm and learning rate of each logged step (``kinds``)."""
    entries = _log(out)
    keys = [k for k in entries[0] if k.startswith(kinds)]
    return np.array([[e[k] for k in keys] for e in entries])


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_hosts_of_two_devices_train_as_one_device(finetune_run, tmp_path):
    """Two jax.distributed processes of two fake CPU devices each (4 devices) against one device:
    the same losses, checkpoints and a loadable model written by the processes together."""
    from xcodec2_jax import load_params
    from xcodec2_jax.utils.tree import flatten

    argv, one = finetune_run
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    address = f"127.0.0.1:{_free_port()}"
    hosts = []
    try:
        for i in range(2):
            multi = ["--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)]
            cmd = [sys.executable, "-m", "xcodec2_jax", *argv, "-o", str(tmp_path / "hosts"), *multi]
            hosts.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        errors = [p.communicate(timeout=300)[1].decode() for p in hosts]
    finally:
        for p in hosts:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    assert [p.returncode for p in hosts] == [0, 0], [e[-2000:] for e in errors]
    losses, reference = _losses(tmp_path / "hosts", "loss/"), _losses(one, "loss/")
    assert len(reference) == FINETUNE_STEPS and (reference[0] != reference[-1]).any()
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    # The first step's gradient norm (same parameters on both) sums the devices' partial sums in another
    # order; later steps' parameters part where Adam's lr · sign(g) flips on near-zero gradients.
    norms = _losses(tmp_path / "hosts", "grad_norm/")[0], _losses(one, "grad_norm/")[0]
    np.testing.assert_allclose(*norms, rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "hosts" / "checkpoints")) == ["4", "6"]
    # The model the hosts saved: each tensor within this run's few updates of the one-device model's.
    hosts_params, one_params = flatten(load_params(str(tmp_path / "hosts"))), flatten(load_params(str(one)))
    assert hosts_params.keys() == one_params.keys()
    for path, value in one_params.items():
        np.testing.assert_allclose(hosts_params[path], value, rtol=0, atol=4 * FINETUNE_STEPS * FINETUNE_LR)


@pytest.mark.subprocess
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(finetune_run, tmp_path):
    argv, one = finetune_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "xcodec2_jax", *argv, "-o", str(out)]
    log = out / "train_log.jsonl"
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    assert 3 <= len(_log(out)) < FINETUNE_STEPS
    assert not (out / "params").exists()

    assert main([*argv, "-o", str(out)]) == 0  # the same command, rerun (in this process: traced already)
    # Resumed from the last checkpoint (step 2 or 4): the losses of the run that never stopped, bit for
    # bit, dropout included.
    np.testing.assert_array_equal(_losses(out), _losses(one))
    assert (out / "params").is_dir()


def test_bfloat16_generator_with_float32_master_weights(tiny_ref):
    import jax
    import jax.numpy as jnp

    from xcodec2_jax.training.generator import Generator
    from xcodec2_jax.training.recipe import RecipeTrainer, split_params

    trainer = RecipeTrainer(tiny_ref.config, _recipe(compute_dtype="bfloat16"))
    generator = {**tiny_ref.params, **Generator(tiny_ref.config).init_training_parts(jax.random.key(0))}
    audio = jax.ShapeDtypeStruct((2, 3200), jnp.float32)
    # The generator computes in bfloat16 and hands float32 outputs to the losses.
    jaxpr, out = jax.make_jaxpr(trainer.generator, return_shape=True)(generator, audio)
    assert "bf16" in str(jaxpr)
    assert out.audio.dtype == out.semantic.dtype == out.semantic_target.dtype == jnp.float32
    # The optimiser updates float32 master weights into float32 weights.
    trainable, _ = split_params(generator, trainer.recipe.trainable)
    opt = jax.eval_shape(trainer.generator_optimizer.init, trainable)
    updates, _ = jax.eval_shape(trainer.generator_optimizer.update, trainable, opt, trainable)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_from_scratch_start_reads_the_semantic_model(tiny_ref, tmp_path):
    import jax

    from xcodec2_jax.training.run import starting_generator

    tiny_ref.model.semantic_encoder.save_pretrained(tmp_path / "w2v")  # transformers' Wav2Vec2BertModel
    (tmp_path / "codec.json").write_text(json.dumps(TINY_CONFIG))
    said = []
    config, params = starting_generator(
        None, str(tmp_path / "codec.json"), str(tmp_path / "w2v"), 0, said.append
    )
    assert config == tiny_ref.config
    assert any("initialised fresh" in line for line in said)
    assert {"fc_post_s", "semantic_decoder"} <= params.keys()
    # The semantic encoder is the given model's, exactly; the rest is random.
    for ours, theirs in zip(
        jax.tree.leaves(params["semantic_encoder"]),
        jax.tree.leaves(tiny_ref.params["semantic_encoder"]),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs)
    kernel = params["acoustic_decoder"]["fc"]["kernel"]
    assert not np.array_equal(kernel, tiny_ref.params["acoustic_decoder"]["fc"]["kernel"])

    with pytest.raises(ValueError, match="needs semantic_model"):
        starting_generator(None, "small", None, 0, said.append)
    with pytest.raises(ValueError, match="either model"):
        starting_generator(tiny_ref.path, "small", None, 0, said.append)
