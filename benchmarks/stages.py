"""The three benchmarked stages (encode, decode, features), each timed for every implementation on one case.

A runner takes the shared ``Context`` (models, params, options), the case (audio, features, codes) and a
dtype name, and returns ``(impl, measurement)`` pairs; agreement with the float32 torch reference is added to
the measurements (codes agreement, audio error relative to peak, feature differences).
"""

from __future__ import annotations

import copy

import numpy as np

from . import measure

SAMPLING_RATE = 16000


def _torch_inputs(feats: dict, dtype):
    import torch

    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feats.items()}
    for k in ("input_values", "input_features"):
        out[k] = out[k].to(dtype)
    return out


def _model_tensors(model) -> list:
    return list(model.parameters()) + list(model.buffers())


def _time(ctx, rows: list) -> None:
    """Times the stage's prepared implementations in alternating rounds (see ``measure.time_interleaved``),
    with a JAX matmul in every round: its median rate, stored in each row as ``probe_matmul_gflop_per_s``,
    is the machine's speed while the stage ran, against which the report also places the FLOP floor."""
    call, flops = ctx.matmul_probe()
    probe = {"call": call}
    measure.time_interleaved([m for _, m in rows] + [probe], ctx.args.reps, ctx.args.max_rep_seconds)
    rate = round(flops / probe["median_s"] / 1e9, 1)
    for _, m in rows:
        m["probe_matmul_gflop_per_s"] = rate


def run_encode(ctx, case, dtype_name: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from xcodec2_jax import Xcodec2Model

    feats, rows, outputs = case["feats"], [], {}
    if not ctx.args.skip_jax:
        model = Xcodec2Model(ctx.config, dtype=jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32)

        def encode(params, input_values, input_features, padding_mask, input_features_mask):
            out = model.apply(
                {"params": params},
                input_values,
                input_features,
                padding_mask,
                input_features_mask,
                method=Xcodec2Model.encode,
            )
            return out.audio_codes

        args = (ctx.params,) + tuple(
            jax.device_put(feats[k])
            for k in ("input_values", "input_features", "padding_mask", "input_features_mask")
        )
        m = measure.measure_jax(encode, args)
        outputs["jax"] = np.asarray(m["output"])
        rows.append(("jax", m))
    for impl, model in ctx.torch_models(dtype_name):
        t_in = _torch_inputs(feats, ctx.torch_dtype(dtype_name))
        if impl == "torch-compile":
            fn = ctx.compiled(model.encode)
        else:
            fn = model.encode
        m = measure.measure_torch(
            lambda fn=fn, t_in=t_in: fn(**t_in).audio_codes,
            external_tensors=_model_tensors(model) + list(t_in.values()),
            compiled=impl == "torch-compile",
        )
        outputs[impl] = m["output"].numpy().astype(np.int32)
        rows.append((impl, m))
    _time(ctx, rows)

    # Agreement with the float32 torch reference of this case (the same dtype's torch run if none).
    reference = case.setdefault("ref_codes", outputs.get("torch") if dtype_name == "float32" else None)
    if reference is None:
        reference = outputs.get("torch")
    for impl, m in rows:
        codes = outputs[impl]
        m["distinct_codes"] = int(np.unique(codes).size)
        if reference is not None and codes is not reference and reference.shape == codes.shape:
            m["codes_agreement"] = float((codes == reference).mean())
    return rows


def run_decode(ctx, case, dtype_name: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from xcodec2_jax import Xcodec2Model

    codes, rows, outputs = case["codes"], [], {}
    if not ctx.args.skip_jax:
        model = Xcodec2Model(ctx.config, dtype=jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32)

        def decode(params, audio_codes):
            return model.apply({"params": params}, audio_codes, method=Xcodec2Model.decode).audio_values

        m = measure.measure_jax(decode, (ctx.params, jax.device_put(codes)))
        outputs["jax"] = np.asarray(m["output"], np.float32)
        rows.append(("jax", m))
    for impl, model in ctx.torch_models(dtype_name):
        t_codes = torch.from_numpy(codes.astype(np.int64))
        fn = ctx.compiled(model.decode) if impl == "torch-compile" else model.decode
        m = measure.measure_torch(
            lambda fn=fn, t_codes=t_codes: fn(audio_codes=t_codes).audio_values,
            external_tensors=_model_tensors(model) + [t_codes],
            compiled=impl == "torch-compile",
        )
        outputs[impl] = m["output"].float().numpy()
        rows.append((impl, m))
    _time(ctx, rows)

    reference = case.setdefault("ref_audio", outputs.get("torch") if dtype_name == "float32" else None)
    if reference is None:
        reference = outputs.get("torch")
    for impl, m in rows:
        if (
            reference is not None
            and outputs[impl] is not reference
            and reference.shape == outputs[impl].shape
        ):
            m["audio_rel_err"] = float(np.abs(outputs[impl] - reference).max() / np.abs(reference).max())
    return rows


def _hf_extractor_fn(audio_values: np.ndarray, padding_mask: np.ndarray):
    """transformers' numpy SeamlessM4T fbank run the way the reference Xcodec2FeatureExtractor loops over
    items (each item's valid part padded hop/2 on both sides), which gives the same features."""
    from transformers import SeamlessM4TFeatureExtractor

    hf = SeamlessM4TFeatureExtractor(
        feature_size=80, num_mel_bins=80, sampling_rate=SAMPLING_RATE, padding_value=1.0, stride=2
    )

    def run():
        items = []
        for row, mask in zip(audio_values[:, 0], padding_mask, strict=True):
            valid = min(-(-int(mask.sum()) // 320) * 320, row.size)
            items.append(np.pad(row[:valid], (160, 160)))
        out = hf(
            items,
            sampling_rate=SAMPLING_RATE,
            padding=True,
            pad_to_multiple_of=2,
            return_attention_mask=True,
            return_tensors="np",
        )
        return out["input_features"]

    return run


def run_features(ctx, case, dtype_name: str) -> list[dict]:
    import jax

    from xcodec2_jax import Xcodec2FeatureExtractor, fbank_features_jax

    if dtype_name != "float32":
        return []
    audio, feats = case["audio"], case["feats"]
    expected, mask = feats["input_features"], feats["input_features_mask"].astype(bool)
    input_bytes = sum(a.nbytes for a in audio)
    rows = []
    extractor = Xcodec2FeatureExtractor()
    m = measure.measure_numpy(lambda: extractor(audio, sampling_rate=SAMPLING_RATE), input_bytes)
    m["output"] = m["output"]["input_features"]
    rows.append(("numpy", m))
    if not ctx.args.skip_jax:
        padded = jax.device_put(feats["input_values"][:, 0])
        lengths = jax.device_put(feats["padding_mask"].sum(-1).astype(np.int32))
        m = measure.measure_jax(lambda x, n: fbank_features_jax(x, n)[0], (padded, lengths))
        rows.append(("jax", m))
    if not ctx.args.skip_torch:
        hf_fn = _hf_extractor_fn(feats["input_values"], feats["padding_mask"])
        m = measure.measure_numpy(hf_fn, feats["input_values"].nbytes)
        rows.append(("hf-numpy", m))
    _time(ctx, rows)
    for _, m in rows:
        out = np.asarray(m["output"])
        if out.shape == expected.shape:
            m["features_max_abs_diff"] = float(np.abs(out[mask] - expected[mask]).max())
    return rows


RUNNERS = {"encode": run_encode, "decode": run_decode, "features": run_features}


class Context:
    def __init__(self, args, torch_model, config, params):
        self.args, self.config, self.params = args, config, params
        self._torch = {"float32": torch_model}
        self._probe = None

    def matmul_probe(self):
        """The (call, FLOPs) of ``measure.matmul_probe``, compiled once."""
        if self._probe is None:
            self._probe = measure.matmul_probe()
        return self._probe

    def torch_dtype(self, dtype_name):
        import torch

        return torch.bfloat16 if dtype_name == "bfloat16" else torch.float32

    def torch_models(self, dtype_name):
        """(impl, model) pairs to time for this dtype."""
        if self.args.skip_torch or self._torch["float32"] is None:
            return []
        if dtype_name not in self._torch:
            self._torch[dtype_name] = copy.deepcopy(self._torch["float32"]).to(self.torch_dtype(dtype_name))
        model = self._torch[dtype_name]
        return [("torch", model)] + ([("torch-compile", model)] if self.args.torch_compile else [])

    def compiled(self, fn):
        """A fresh ``torch.compile`` of ``fn`` with dynamo's caches cleared, so the measurement's first call
        is a cold compile for its shape (dynamic=False, one graph per shape as ``jit``) and no earlier
        shape or dtype counts against dynamo's recompile limit (past it, dynamo silently runs eager)."""
        import torch

        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
