"""Tokenizing a corpus: ``tokenize`` (and ``xcodec2-jax tokenize``); see README "Tokenizing a corpus"."""

from .run import tokenize

__all__ = ["tokenize"]
