"""Evaluation tasks (generated locally, no downloads) and their scoring."""

from .passkey import PasskeySample, make_passkey, score_passkey

__all__ = ["PasskeySample", "make_passkey", "score_passkey"]
