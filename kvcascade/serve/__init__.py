"""``kvcascade serve``: an OpenAI-compatible server with a bounded KV budget per request (:mod:`.app`), on one
inference thread that shares the model among requests with admission by KV bytes (:mod:`.scheduler`)."""

from .app import Server, build_app
from .scheduler import Scheduler, kv_bound_bytes

__all__ = ["Server", "Scheduler", "build_app", "kv_bound_bytes"]
