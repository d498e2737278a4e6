"""Fine-tuning: loss falls, a killed run resumes to the same losses, the output loads, the step is
the same on 4 devices as on 1, and bad data is reported."""

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
from conftest import SMALL_CONFIG, _make_reference, load_speech, run_python

from xcodec2_jax.cli import main

STEPS, SAVE_EVERY = 30, 5
RUN_ARGS = ["--steps", str(STEPS), "--batch-size", "2", "--segment-seconds", "1", "--lr", "1e-3"]


# SMALL_CONFIG with one conformer and one decoder layer: the train step compiles in half the time.
TINY_CONFIG = dict(
    SMALL_CONFIG,
    num_hidden_layers=1,
    semantic_model_config=dict(SMALL_CONFIG["semantic_model_config"], num_hidden_layers=1),
)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    return _make_reference(tmp_path_factory, "tiny", TINY_CONFIG)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A 1.3 s clip of speech (segments of 1 s start anywhere in its first 0.3 s) and a broken file."""
    path = tmp_path_factory.mktemp("train_data")
    sf.write(path / "clip.wav", load_speech()[0][8000:28800], 16000)
    (path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_ref, data_dir, tmp_path_factory):
    from xcodec2_jax.training.finetune import finetune

    out = tmp_path_factory.mktemp("finetune_full")
    log = finetune(
        str(data_dir),
        str(out),
        model=tiny_ref.path,
        steps=STEPS,
        batch_size=2,
        segment_seconds=1.0,
        learning_rate=1e-3,
        save_every=SAVE_EVERY,
        progress=False,
    )
    return out, log


def _losses(out) -> list[float]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
    return [e["loss"] for e in entries]


@pytest.mark.slow
def test_finetune_loss_falls_and_output_loads(uninterrupted, tiny_ref):
    from xcodec2_jax import Xcodec2Codec, load_params
    from xcodec2_jax.utils.tree import flatten

    out, log = uninterrupted
    losses = _losses(out)
    assert losses == [e["loss"] for e in log] and len(losses) == STEPS
    assert {"step", "loss", "lr", "seconds"} <= set(log[0])
    assert log[0]["lr"] == 0.0 and max(e["lr"] for e in log) == pytest.approx(1e-3)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses

    # The encoder was frozen, the decoder trained.
    tuned = flatten(load_params(str(out)))
    original = flatten(tiny_ref.params)
    assert tuned.keys() == original.keys()
    for path, value in original.items():
        same = np.array_equal(tuned[path], value)
        assert same if path[0] != "acoustic_decoder" else not same, path
    codec = Xcodec2Codec.from_pretrained(str(out))
    codes = codec.encode(load_speech()[1][:16000], 16000)
    assert codes.codes.shape == (1, 51) and codes.codes.max() < codec.config.codebook_size


@pytest.mark.subprocess
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(uninterrupted, tiny_ref, data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "xcodec2_jax", "finetune", str(data_dir), "-o", str(out)]
    cmd += ["--model", tiny_ref.path, *RUN_ARGS, "--save-every", str(SAVE_EVERY)]
    log = out / "train_log.jsonl"
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 12:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    done = len(_losses(out))
    assert 12 <= done < STEPS
    assert not (out / "params").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "broken.wav: skipped:" in rerun.stderr
    # Resumed from the last checkpoint (a multiple of SAVE_EVERY), same losses bit for bit.
    assert _losses(out) == _losses(uninterrupted[0])
    assert (out / "params").is_dir()


_DEVICES_CHILD = """
import json, sys
import jax, numpy as np, optax
from xcodec2_jax import load_checkpoint
from xcodec2_jax.training.trainer import TrainConfig, Trainer
assert jax.device_count() == 4, jax.devices()
config, params = load_checkpoint(sys.argv[1])
audio = np.load(sys.argv[2])
results = {}
# Plain SGD: AdamW's first updates are lr * sign(g), which float noise flips where g is ~0.
sgd = optax.sgd(0.05)
for n in (1, 4):
    trainer = Trainer(config, TrainConfig(steps=10), jax.devices()[:n], optimizer=sgd)
    state, frozen = trainer.init_state(params)
    start = [np.asarray(a) for a in jax.tree.leaves(state.params)]
    state, metrics = trainer.step(state, frozen, audio)
    losses = [float(metrics["loss"])]
    assert state.params.keys() == {"acoustic_decoder"}
    leaves = [np.asarray(a) for a in jax.tree.leaves(state.params)]
    shardings = {str(x.sharding) for x in jax.tree.leaves(state)}
    state, metrics = trainer.step(state, frozen, audio)
    losses.append(float(metrics["loss"]))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(leaves, start))
    np.savez(sys.argv[3] + f"/params{n}.npz", *leaves)
    np.savez(sys.argv[3] + "/start.npz", *start)
    results[n] = dict(losses=losses, moved=moved, shardings=sorted(shardings))
print("RESULT" + json.dumps(results))
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_step_on_four_devices_matches_one(tiny_ref, tmp_path):
    speech = load_speech()[2]
    np.save(tmp_path / "audio.npy", np.stack([speech[i * 4000 : i * 4000 + 6400] for i in range(4)]))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    args = [tiny_ref.path, str(tmp_path / "audio.npy"), str(tmp_path)]
    res = run_python(_DEVICES_CHILD, args, env, "RESULT")
    one, four = res["1"], res["4"]
    assert one["moved"] > 1e-4 and four["moved"] > 1e-4
    # Params and optimizer state replicated over the 4-device mesh.
    assert four["shardings"] and all("'data': 4" in x and "spec=P()" in x for x in four["shardings"])
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    assert four["losses"][1] != four["losses"][0]
    params1, params4 = np.load(tmp_path / "params1.npz"), np.load(tmp_path / "params4.npz")
    start = np.load(tmp_path / "start.npz")
    assert len(params1.files) == len(params4.files) == len(start.files) > 10
    for name in params1.files:
        # The per-device batch changes XLA's kernels, hence the audio's last bits; the log-mel and
        # log-magnitude losses amplify that to ~4e-4 of a leaf's largest gradient (a reordered batch
        # on one device, same kernels: 7e-7). The first step's updates are compared at 1e-3 of the
        # leaf's largest update.
        # Tiny updates of O(1) weights (norm scales) also see the weights' own float32 spacing.
        update1, update4 = params1[name] - start[name], params4[name] - start[name]
        atol = max(1e-3 * np.abs(update1).max(), 4 * np.spacing(np.abs(start[name]).max()))
        np.testing.assert_allclose(update4, update1, rtol=0, atol=atol, err_msg=name)


def test_cli_reports_data_without_usable_audio(tmp_path, capsys, tiny_ref):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["finetune", str(empty), "-o", str(tmp_path / "o"), "--model", tiny_ref.path]) == 2
    assert "no usable audio (it holds no audio files" in capsys.readouterr().err

    (empty / "bad.flac").write_bytes(b"\0" * 100)
    (empty / "notes.txt").write_text("not audio")
    assert main(["finetune", str(empty), "-o", str(tmp_path / "o"), "--model", tiny_ref.path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert any("bad.flac: skipped: cannot read audio" in line for line in err)
    assert "no usable audio (none of its 1 file(s) could be read" in err[-1]

    manifest = tmp_path / "list.txt"
    manifest.write_text("# a comment\nempty/bad.flac\nmissing.wav\n")
    assert main(["finetune", str(manifest), "-o", str(tmp_path / "o"), "--model", tiny_ref.path]) == 2
    assert "none of its 2 file(s)" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused(uninterrupted, data_dir, tiny_ref, capsys):
    out = uninterrupted[0]
    argv = ["finetune", str(data_dir), "-o", str(out), "--model", tiny_ref.path, *RUN_ARGS]
    assert main([*argv[:-1], "5e-4"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_train_config_validation():
    from xcodec2_jax.training.trainer import TrainConfig, split_params

    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="no such module"):
        split_params({"acoustic_decoder": {}}, ("decoder",))


@pytest.mark.slow
def test_bfloat16_step_keeps_float32_master_weights(tiny_ref):
    import jax
    import jax.numpy as jnp

    from xcodec2_jax.training.trainer import TrainConfig, Trainer

    trainer = Trainer(tiny_ref.config, TrainConfig(compute_dtype="bfloat16"))
    state, frozen = trainer.init_state(tiny_ref.params)
    audio = jax.ShapeDtypeStruct((2, 3200), jnp.float32)
    new_state, metrics = jax.eval_shape(trainer._train_step, state, frozen, audio)
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    # The decoder's matmuls run in bfloat16; the frozen encoder's codes stay float32.
    jaxpr = str(jax.make_jaxpr(trainer._train_step)(state, frozen, audio))
    assert "bf16" in jaxpr
    assert trainer.encoder.dtype == jnp.float32 and trainer.model.dtype == jnp.bfloat16
