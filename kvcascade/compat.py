"""Everything that depends on which ``transformers`` release is installed, in one place.

kvcascade supports the releases in ``pyproject.toml``'s range (CI tests the oldest and the newest of it). What
changed inside that range, and how it is handled here:

* The model's cache argument: ``past_key_values=`` up to 5.23; ``cache=`` from 5.24 (``past_key_values`` is
  deprecated there, to be removed in 5.40). :func:`model_forward` reads the installed model's ``forward``
  signature and passes the cache under the name it takes.
* ``Cache.update``: called as ``update(k, v, layer_idx, cache_kwargs)`` up to 5.23 and as
  ``update(k, v, layer_idx, kwargs=...)`` from 5.24. :class:`kvcascade.cache.CompressedCache` accepts any extra
  arguments (it needs none of them).

Nothing else in the package looks at the ``transformers`` version.
"""

from __future__ import annotations

import functools
import inspect

import transformers

TRANSFORMERS_VERSION = transformers.__version__


@functools.lru_cache(maxsize=None)
def _cache_argument(forward) -> str:
    params = inspect.signature(forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    # a model whose forward takes **kwargs only: the older name is the one every 5.x release still accepts
    return "past_key_values"


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward takes a KV cache (``cache`` or ``past_key_values``)."""
    return _cache_argument(type(model).forward)


def model_forward(model, input_ids, cache, position_ids, **kwargs):
    """``model(input_ids=..., <cache argument>=cache, position_ids=..., use_cache=True, **kwargs)``."""
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                 **{cache_argument(model): cache}, **kwargs)
