"""Inter-layer attention sharing (PoD, Ma et al., arXiv 2412.02252): layer-similarity calibration and grouping
(:mod:`.calibrate`, ``kvcascade calibrate interlayer``) and the shared-score attention with its storage
accounting (:mod:`.attention`, the plain-PyTorch reference). Not yet wired into the engine or the Triton kernels
(issue 12 tracks what is left)."""

from .attention import proximal_mask, shared_attention, storage_bytes
from .calibrate import calibrate, group_layers, load_groups, regroup, save_groups

__all__ = ["calibrate", "group_layers", "load_groups", "proximal_mask", "regroup", "save_groups",
           "shared_attention", "storage_bytes"]
