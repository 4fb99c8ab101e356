"""Local texts every install has: the King James Bible shipped with the package (and its Old / New Testament
parts), and the Python source files installed with the package's dependencies (real code text)."""

from __future__ import annotations

import functools
import hashlib
import lzma
from pathlib import Path

from .errors import KVCascadeError

KJV_FILE = Path(__file__).resolve().parent / "data" / "kjv.txt.xz"
KJV_SHA256 = "82fa5f3788c6a9a010fb128a0f0bf588984b5888a82058520620eded59b033ea"  # of the decompressed text


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
    """The whole King James Bible (public domain), shipped with the package.

    The text is what Debian's ``bible-kjv`` 4.38 prints for ``bible "Gen1:1-Rev22:21"`` (4,298,239 bytes, about
    1.16M tokens for the default model), xz-compressed; its sha256 is checked on every load.
    """
    try:
        data = lzma.decompress(KJV_FILE.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise KVCascadeError(f"cannot read the shipped King James text '{KJV_FILE}': {e}; reinstall kvcascade") from None
    if hashlib.sha256(data).hexdigest() != KJV_SHA256:
        raise KVCascadeError(f"the shipped King James text '{KJV_FILE}' is corrupt (sha256 mismatch); reinstall kvcascade")
    return data.decode("utf-8")


KJV_PARTS = ("all", "ot", "nt")


def kjv_part(part: str = "all") -> str:
    """The whole shipped King James text, its Old Testament (Genesis-Malachi: what Locret heads train on) or its
    New Testament (Matthew-Revelation, about 270K tokens: held out for evaluating them)."""
    if part not in KJV_PARTS:
        raise KVCascadeError(f"King James part must be one of {', '.join(KJV_PARTS)}, got '{part}'")
    text = kjv_text()
    cut = text.index("\nMatthew 1\n")
    return text if part == "all" else text[:cut] if part == "ot" else text[cut + 1:]


def python_sources(limit_bytes: int = 40_000_000) -> list[Path]:
    """Python files installed with the package's dependencies (real code text on any machine)."""
    import importlib.util
    import sysconfig

    roots = []
    for mod in ("torch", "transformers", "numpy", "tokenizers", "safetensors", "tqdm"):
        spec = importlib.util.find_spec(mod)
        if spec and spec.submodule_search_locations:
            roots.append(Path(list(spec.submodule_search_locations)[0]))
    roots.append(Path(sysconfig.get_paths()["stdlib"]))
    files, total = [], 0
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if "test" in p.name or "/tests/" in str(p):
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if 2_000 <= size <= 200_000:
                files.append(p)
                total += size
                if total > limit_bytes:
                    return files
    return files
