"""Streaming decode: exact lengths for any push sizes, one compilation per stream configuration,
equality with the one-piece decode when context and lookahead cover the stream, batched streams equal
to single ones, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from xcodec2_jax import Xcodec2Codec

HOP = 320


@pytest.fixture(scope="module")
def codec(small_ref):
    return Xcodec2Codec.from_pretrained(small_ref.path, compilation_cache=False)


@pytest.fixture(scope="module")
def codes(small_ref):
    return np.random.default_rng(1).integers(0, small_ref.config.codebook_size, 57).astype(np.int32)


def _pushes(rng, codes):
    """``codes`` cut at random places, empty pushes included."""
    cuts = np.sort(rng.integers(0, len(codes) + 1, 9))
    return np.split(codes, cuts)


def _stream(stream, pieces, stream_id=0):
    parts = [stream.push(p, stream=stream_id) for p in pieces]
    parts.append(stream.flush(stream=stream_id))
    return parts


def test_random_push_sizes_exact_length_one_compilation(codec, codes):
    rng = np.random.default_rng(0)
    before = codec.programs.decode.num_compiled()
    results = []
    for _ in range(3):
        stream = codec.decode_stream(chunk=5, lookahead=3, context=7)
        parts = _stream(stream, _pushes(rng, codes))
        assert all(p.dtype == np.float32 and p.ndim == 1 for p in parts)
        audio = np.concatenate(parts)
        assert audio.shape == (len(codes) * HOP,)
        results.append(audio)
    # Three streams and dozens of pushes: one program, of shape (1, context + chunk + lookahead).
    assert codec.programs.decode.num_compiled() - before == 1
    # What a chunk decodes from never depends on how the codes were split into pushes.
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_audio_is_released_once_lookahead_is_there(codec, codes):
    stream = codec.decode_stream(chunk=5, lookahead=3, context=7)
    assert stream.first_audio_codes == 8
    assert stream.push(codes[:7]).size == 0
    assert stream.push(codes[7:8]).size == 5 * HOP
    assert stream.push(codes[8:20]).size == 10 * HOP  # final up to code 15: 20 - lookahead = 17 -> 15
    rest = stream.flush()
    assert rest.size == (len(codes[:20]) - 15) * HOP


def test_covering_context_and_lookahead_equal_one_piece_decode(codec, codes):
    n = len(codes)
    whole = codec.decode(codes)[0]
    stream = codec.decode_stream(chunk=8, lookahead=n, context=n)
    audio = np.concatenate(_stream(stream, _pushes(np.random.default_rng(2), codes)))
    np.testing.assert_allclose(audio, whole, atol=1e-5 * np.abs(whole).max())


def test_short_context_differs_but_stays_close(codec, codes):
    """The decoder is bidirectional: a short window changes the audio a little, not wholly."""
    whole = codec.decode(codes)[0]
    stream = codec.decode_stream(chunk=5, lookahead=2, context=2)
    audio = np.concatenate(_stream(stream, [codes]))
    err = np.abs(audio - whole).max() / np.abs(whole).max()
    assert 1e-5 < err
    snr = 10 * np.log10(np.sum(whole**2) / np.sum((audio - whole) ** 2))
    assert snr > 0


@pytest.mark.slow
def test_batched_streams_equal_single_streams(codec, small_ref):
    rng = np.random.default_rng(3)
    lengths = [41, 12, 30]
    items = [rng.integers(0, small_ref.config.codebook_size, n).astype(np.int32) for n in lengths]
    singles = []
    for item in items:
        stream = codec.decode_stream(chunk=4, lookahead=2, context=6)
        singles.append(np.concatenate(_stream(stream, [item])))
    batched = codec.decode_stream(chunk=4, lookahead=2, context=6, batch_size=3)
    outs = [[] for _ in items]
    # Streams advance unevenly: every step pushes a random number of codes to each (or none).
    offsets = [0, 0, 0]
    while any(o < len(it) for o, it in zip(offsets, items, strict=True)):
        step = []
        for i, item in enumerate(items):
            k = int(rng.integers(0, 6))
            step.append(item[offsets[i] : offsets[i] + k] if k else None)
            offsets[i] += k
        for i, part in enumerate(batched.push_batch(step)):
            outs[i].append(part)
    outs[1].append(batched.flush(stream=1))  # one stream ends early, the others go on together
    for i, part in enumerate(batched.flush_batch()):
        outs[i].append(part)
    for single, parts, n in zip(singles, outs, lengths, strict=True):
        audio = np.concatenate(parts)
        assert audio.shape == (n * HOP,)
        np.testing.assert_allclose(audio, single, atol=1e-5 * np.abs(single).max())


def test_bad_input(codec, small_ref):
    size = small_ref.config.codebook_size
    stream = codec.decode_stream(chunk=4, lookahead=1, context=2, batch_size=2)
    with pytest.raises(ValueError, match=rf"stream 0: codes must lie in \[0, {size}\)"):
        stream.push(np.array([1, size], np.int32))
    with pytest.raises(ValueError, match="codes must lie in"):
        stream.push(np.array([-1]))
    with pytest.raises(ValueError, match="integer dtype"):
        stream.push(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        stream.push(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="stream 2 does not exist"):
        stream.push(np.array([1]), stream=2)
    with pytest.raises(ValueError, match="one entry per stream"):
        stream.push_batch([np.array([1])])
    # A bad push changes nothing: the stream still gives exactly its valid codes' audio.
    assert stream.push(np.arange(3)).size == 0
    assert stream.flush().size == 3 * HOP
    with pytest.raises(ValueError, match="stream 0 was flushed"):
        stream.push(np.array([1]))
    with pytest.raises(ValueError, match="already flushed"):
        stream.flush()
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        codec.decode_stream(chunk=0)
    with pytest.raises(ValueError, match="lookahead"):
        codec.decode_stream(lookahead=-1)
    with pytest.raises(ValueError, match="batch_size"):
        codec.decode_stream(batch_size=0)
