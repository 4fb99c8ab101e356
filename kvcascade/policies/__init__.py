"""Cache policies: one file per method, one registry name each (``kvcascade policies`` lists them)."""

from . import cascade, full, h2o, interlayer, locret, pyramidkv, snapkv, streaming, tova, window  # noqa: F401  (registration)
from .base import REGISTRY, Policy, describe_policies, make_policy, parse_policy_spec, register

__all__ = ["REGISTRY", "Policy", "describe_policies", "make_policy", "parse_policy_spec", "register"]
