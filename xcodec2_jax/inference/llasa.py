"""X-Codec2 codes <-> the speech tokens of Llasa, the Llama-based TTS model trained on them.

Llasa's tokenizer is Llama 3's (128,256 entries) plus 8 special tokens
(``<|TEXT_GENERATION_START|>`` .. ``<|SPEECH_UNDERSTANDING_END|>``, ids 128256-128263) plus one token
per code, ``<|s_0|>`` .. ``<|s_65535|>``, added last. So code ``c`` is the string ``<|s_c|>`` and the
token id ``offset + c``, where ``offset`` is the id of ``<|s_0|>``: ask the tokenizer,
``tokenizer.convert_tokens_to_ids("<|s_0|>")`` (128264 for HKUSTAudio/Llasa-1B, -3B and -8B, which is
:data:`LLASA_SPEECH_OFFSET`). Raw codes fed to the LM without the offset overlap the text vocabulary,
the mistake of zhenye234/LLaSA_training#20; :func:`ids_to_codes` refuses ids outside the speech range
by default so a wrong offset shows up as an error, not as noise.
"""

from __future__ import annotations

import re

import numpy as np

from ..utils import validation

CODEBOOK_SIZE = 65536
LLASA_SPEECH_OFFSET = 128264  # id of <|s_0|> in the released Llasa tokenizers: 128256 (Llama 3) + 8

_PREFIX = "<|s_"
# A speech token as the tokenizer holds it: decimal without leading zeros (<|s_7|>, never <|s_007|>).
_TOKEN = re.compile(r"<\|s_(0|[1-9][0-9]*)\|>")


def _as_code_array(values, name: str) -> np.ndarray:
    """A 1-D integer array; (1, N) and (1, 1, N) (one item from the model) are flattened."""
    arr = np.asarray(values)
    if arr.ndim > 1 and all(d == 1 for d in arr.shape[:-1]):
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence (one utterance), got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_codes(codes, codebook_size: int) -> np.ndarray:
    size = validation.codebook_size(codebook_size)
    return validation.codes(_as_code_array(codes, "codes"), size).astype(np.int64)


def codes_to_text(codes, *, codebook_size: int = CODEBOOK_SIZE) -> str:
    """Codes (N,) -> ``"<|s_123|><|s_9|>..."``, the strings of Llasa's speech tokens."""
    return "".join(f"<|s_{c}|>" for c in _check_codes(codes, codebook_size).tolist())


def _snippet(text: str, start: int) -> str:
    """The malformed token for the error message: up to its closing ``|>``, at most 24 characters."""
    end = text.find("|>", start + len(_PREFIX))
    stop = min(len(text), start + 24) if end < 0 else min(end + 2, start + 24)
    return text[start:stop]


def text_to_codes(text: str, *, codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
    """Generated text -> int32 codes (N,), one per ``<|s_N|>`` token, in order.

    Every other token or character (``<|SPEECH_GENERATION_START|>``, ``<|SPEECH_GENERATION_END|>``,
    ``<|eot_id|>``, whitespace, text) is ignored. Anything that starts like a speech token (``<|s_``)
    but is not one (``<|s_x|>``, ``<|s_-1|>``, ``<|s_007|>``, an unclosed ``<|s_12``) or names a code
    outside the codebook is a ``ValueError`` naming the token and its character position.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    validation.codebook_size(codebook_size)
    codes = []
    pos = text.find(_PREFIX)
    while pos >= 0:
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"malformed speech token {_snippet(text, pos)!r} at character {pos}")
        value = int(match.group(1))
        if value >= codebook_size:
            raise ValueError(
                f"speech token {match.group(0)!r} at character {pos} is out of range: the codebook has "
                f"{codebook_size} entries (<|s_0|> .. <|s_{codebook_size - 1}|>)"
            )
        codes.append(value)
        pos = text.find(_PREFIX, match.end())
    return np.asarray(codes, np.int32)


def _check_offset(offset) -> int:
    if not validation.is_int(offset) or offset < 0:
        raise ValueError(
            f"offset must be a non-negative integer (the id of <|s_0|>: "
            f'tokenizer.convert_tokens_to_ids("<|s_0|>")), got {offset!r}'
        )
    return int(offset)


def codes_to_ids(codes, offset: int, *, codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
    """Codes (N,) -> int64 token ids ``offset + code`` (``offset``: the id of ``<|s_0|>``)."""
    offset = _check_offset(offset)
    return _check_codes(codes, codebook_size) + offset


def ids_to_codes(
    ids, offset: int, *, skip_other: bool = False, codebook_size: int = CODEBOOK_SIZE
) -> np.ndarray:
    """Token ids (N,) -> int32 codes ``id - offset``.

    Every id must be a speech token, in ``[offset, offset + codebook_size)``; else a ``ValueError``
    names the first one outside (a wrong ``offset`` usually shows up so). ``skip_other=True`` drops
    the ids below ``offset`` instead (the text and special tokens of the base vocabulary, e.g. the
    generation's final ``<|SPEECH_GENERATION_END|>``); ids past the speech range stay an error.
    """
    offset = _check_offset(offset)
    validation.codebook_size(codebook_size)
    arr = _as_code_array(ids, "ids")
    keep = arr >= offset if skip_other else np.ones(arr.shape, bool)
    bad = np.flatnonzero(keep & ((arr < offset) | (arr >= offset + codebook_size)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"token id {int(arr[i])} at position {i} is not a speech token: speech tokens are ids "
            f"[{offset}, {offset + codebook_size}) for offset {offset} ({bad.size} such ids; "
            f"skip_other=True drops text and special tokens below the offset)"
        )
    return (arr[keep] - offset).astype(np.int32)
