"""The full default config (the released model's sizes) against transformers' model with random
weights: the checks of the other modules, run here on one full-size reference that this module
builds and releases when it ends, so the suite never holds two."""

from __future__ import annotations

import pytest
from checkpoint.test_checkpoint import test_every_key_used_and_every_leaf_filled as _every_key
from modeling.test_decoder import test_decode_codes_matches_reference as _decode_codes
from modeling.test_decoder import test_decode_latents_matches_reference as _decode_latents
from modeling.test_model import test_codes_equal_reference_per_utterance as _codes_per_utterance
from modeling.test_model import test_submodules_match_reference as _submodules

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def test_every_key_used_and_every_leaf_filled(full_ref, request):
    _every_key("full_ref", request)


def test_decode_codes_matches_reference(full_ref, request):
    _decode_codes("full_ref", request)


def test_decode_latents_matches_reference(full_ref, request):
    _decode_latents("full_ref", request)


def test_codes_equal_reference_per_utterance(full_ref, request):
    _codes_per_utterance("full_ref", 2.0, request)


def test_submodules_match_reference(full_ref, request):
    _submodules("full_ref", request)
