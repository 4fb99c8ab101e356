"""kvcascade: long-context LLM inference under a fixed KV-cache budget, with interchangeable cache policies.

Quick start::

    import kvcascade
    model, tok = kvcascade.load_model("qwen2.5-coder-0.5b")
    out = kvcascade.generate(model, tok, "a long prompt ...", policy="streaming", budget=2048)
    print(out.text, out.kv_bytes_peak, out.prefill_s)
"""

from .cache import CompressedCache
from .engine import GenerationResult, generate
from .errors import KVCascadeError
from .models import DEFAULT_MODEL, MODELS, list_models, load_model, prepare
from .policies import REGISTRY as POLICIES
from .policies import Policy, describe_policies, make_policy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "MODELS", "POLICIES", "CompressedCache", "GenerationResult", "KVCascadeError", "Policy",
    "describe_policies", "generate", "list_models", "load_model", "make_policy", "prepare",
]
