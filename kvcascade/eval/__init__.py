"""Evaluation: tasks (generated locally, no downloads), scoring, the runner over policies x budgets x lengths,
and reports."""

from .passkey import PasskeySample, make_passkey, score_passkey
from .tasks import RULER, TASKS, Sample, make_sample, score, string_match_all

__all__ = ["PasskeySample", "make_passkey", "score_passkey", "Sample", "make_sample", "score", "string_match_all",
           "TASKS", "RULER", "Grid", "run_grid", "write_report"]


def __getattr__(name):  # the runner and report import the engine and matplotlib lazily
    if name in ("Grid", "run_grid"):
        from . import runner

        return getattr(runner, name)
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(name)
