"""Progress bars that suit where the output goes.

On a terminal: a normal ``tqdm`` bar on stderr. Anywhere else (a log file, CI, a pipe, ``--json`` runs): the
bar redraws at most once every :data:`LOG_INTERVAL_S` seconds, each redraw a full line, so a 1M-token run's log
holds a handful of progress lines instead of thousands. ``KVCASCADE_PROGRESS=0`` turns every bar off,
``=1`` forces terminal behaviour.
"""

from __future__ import annotations

import os
import sys

LOG_INTERVAL_S = 30.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total=None, desc: str = "", unit: str = "it", enabled: bool = True, stream=None, **kwargs):
    """A ``tqdm`` bar on ``stream`` (stderr), quiet off a terminal; a disabled bar when ``enabled`` is false."""
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    mode = os.environ.get("KVCASCADE_PROGRESS", "auto")
    if mode == "0":
        enabled = False
    terminal = mode == "1" or _is_terminal(stream)
    opts = {"leave": False}
    if not terminal:
        # one line per redraw (no carriage-return animation), and only every LOG_INTERVAL_S seconds
        opts = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S, "miniters": 0, "ascii": True,
                "ncols": 100, "leave": True}
    opts.update(kwargs)
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled, dynamic_ncols=False, **opts)
