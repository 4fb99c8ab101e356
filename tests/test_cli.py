"""The command line: every user mistake gives one clear line on stderr and exit status 2."""

import json
import subprocess
import sys

import pytest
import torch

from kvcascade import cli
from kvcascade.errors import KVCascadeError


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
    (["generate", "--policy", "nope", "--prompt", "hi"], "unknown policy 'nope'"),
    (["generate", "--policy", "streaming", "--policy-arg", "sink=3", "--prompt", "hi"], "has no parameter sink"),
    (["generate", "--policy", "streaming", "--policy-arg", "sinks", "--prompt", "hi"], "takes key=value"),
    (["generate", "--policy", "streaming", "--budget", "4", "--policy-arg", "sinks=4", "--prompt", "hi"],
     "must be larger than sinks"),
    (["generate", "--policy", "window", "--budget", "0", "--prompt", "hi"], "budget must be a positive"),
    (["generate", "--policy", "window", "--budget", "-5", "--prompt", "hi"], "budget must be a positive"),
    (["generate", "--policy", "h2o", "--policy-arg", "recent_ratio=abc", "--prompt", "hi"], "is not a float"),
    (["generate", "--prompt", "   "], "the prompt is empty"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "cannot read prompt file"),
    (["generate", "--device", "cuda", "--prompt", "hi"], "no CUDA device"),
    (["generate", "--device", "tpu", "--prompt", "hi"], "unknown device"),
    (["generate", "--dtype", "int3", "--prompt", "hi"], "unknown dtype"),
    (["demo", "--policy", "snapkv", "--budget", "16", "--policy-arg", "window=16"], "window (16) must be in"),
])
def test_bad_input_is_one_clear_line(argv, needle, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run(argv, capsys)
    assert code == 2
    assert needle in err
    assert err.startswith("kvcascade: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_empty_prompt_file(tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_text("\n")
    code, _, err = run(["generate", "--prompt-file", str(f)], capsys)
    assert code == 2 and "the prompt is empty" in err


def test_binary_prompt_file(tmp_path, capsys):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    code, _, err = run(["generate", "--prompt-file", str(f)], capsys)
    assert code == 2 and "cannot read prompt file" in err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(str(tmp_path))
    code, _, err = run(["generate", "--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2 and "architecture 'gpt2' is not supported" in err


def test_directory_without_config(tmp_path, capsys):
    code, _, err = run(["generate", "--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2 and "without config.json" in err


def test_generate_json_on_tiny_model(tiny_model_dir, capsys):
    import kvcascade

    prompt = " ".join(f"w{i % 60}" for i in range(50))
    _, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    code, out, err = run(["generate", "--model", str(tiny_model_dir), "--policy", "streaming", "--budget", "8",
                          "--policy-arg", "sinks=2", "--prompt", prompt,
                          "--max-new-tokens", "5", "--chunk-size", "16", "--json", "--quiet"], capsys)
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    for key in ("text", "prompt_tokens", "kv_tokens_peak", "kv_bytes_peak", "prefill_s", "decode_s"):
        assert key in row
    assert row["prompt_tokens"] == len(tok(prompt).input_ids) > 8 + 16
    assert row["kv_tokens_peak"] <= 8 + 16
    assert row["kv_bytes_peak"] < row["kv_bytes_full"]
    assert row["params"] == {"budget": 8, "sinks": 2}


def test_generate_streams_text(tiny_model_dir, capsys):
    code, out, err = run(["generate", "--model", str(tiny_model_dir), "--policy", "full", "--prompt", "w1 w2 w3",
                          "--max-new-tokens", "4", "--quiet"], capsys)
    assert code == 0, err
    assert "prompt tokens" in err and "KV peak" in err


def test_policies_lists_every_policy(capsys):
    from kvcascade.policies import REGISTRY

    code, out, _ = run(["policies", "--json"], capsys)
    assert code == 0
    info = {p["name"]: p for p in json.loads(out)}
    assert set(info) == set(REGISTRY)
    assert info["streaming"]["params"]["sinks"]["default"] == 4
    code, out, _ = run(["policies"], capsys)
    assert "streaming" in out and "sinks" in out


def test_models_list(capsys):
    code, out, _ = run(["models", "list", "--json"], capsys)
    assert code == 0
    names = [r["name"] for r in json.loads(out)]
    assert names[0] == "qwen2.5-coder-0.5b" and "gemma-3-270m" in names


def test_models_prepare_unknown(capsys):
    code, _, err = run(["models", "prepare", "nope"], capsys)
    assert code == 2 and "unknown model 'nope'" in err


def test_console_script_exit_code():
    """The installed entry point behaves like cli.main (exit status 2, one line)."""
    p = subprocess.run([sys.executable, "-m", "kvcascade.cli", "generate", "--policy", "zzz", "--prompt", "x"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "kvcascade: error: unknown policy 'zzz'; known policies: " + \
        ", ".join(sorted(__import__("kvcascade").POLICIES))


def test_api_errors():
    import kvcascade

    with pytest.raises(KVCascadeError, match="unknown policy"):
        kvcascade.make_policy("nope")
    with pytest.raises(KVCascadeError, match="takes no budget"):
        kvcascade.make_policy("full", budget=10)


@pytest.mark.parametrize("extra,needle", [
    (["--budget", "64", "--policy-arg", "budget=50"], "budget is given twice"),
    (["--temperature", "nan"], "temperature must be a finite number"),
])
def test_more_bad_generate_input(tiny_model_dir, extra, needle, capsys):
    code, _, err = run(["generate", "--model", str(tiny_model_dir), "--prompt", "w1 w2", "--quiet"] + extra, capsys)
    assert code == 2 and needle in err and err.startswith("kvcascade: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a model at all" * 100])
def test_corrupt_gguf_is_one_clear_line(tmp_path, monkeypatch, content, capsys):
    monkeypatch.setenv("KVCASCADE_HOME", str(tmp_path / "home"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(content)
    code, _, err = run(["generate", "--model", str(f), "--prompt", "hi", "--quiet"], capsys)
    assert code == 2 and err.startswith("kvcascade: error: ") and err.count("\n") == 1, err
    assert str(f.name) in err


def test_model_folder_without_weights(tiny_model_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, d)
    for w in d.glob("*.safetensors"):
        w.unlink()
    code, _, err = run(["generate", "--model", str(d), "--prompt", "w1 w2", "--quiet"], capsys)
    assert code == 2 and err.startswith("kvcascade: error: cannot load the model") and err.count("\n") == 1, err


def test_policies_says_what_happens_on_sliding_window_layers(capsys):
    code, out, _ = run(["policies"], capsys)
    assert code == 0 and "sliding-window layers" in out and "window - 1 tokens" in out


def test_past_window_warning_is_one_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    import kvcascade.engine

    d = tmp_path / "short-window"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    kvcascade.engine._WARNED.clear()
    code, _, err = run(["generate", "--model", str(d), "--policy", "h2o", "--budget", "8", "--chunk-size", "8",
                        "--prompt", " ".join(["w1"] * 40), "--max-new-tokens", "1", "--quiet"], capsys)
    lines = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(lines) == 1 and lines[0].startswith("kvcascade: warning: policy 'h2o'"), err


def test_report_plots_a_bench_generate_file_and_refuses_another_json(tmp_path, capsys):
    """`kvcascade report FILE.json` draws a bench generate file (decode tokens/s per method and context); a JSON
    file of another kind gets one clear line and exit 2."""
    import json

    rows = [{"T": T, "method": m, "decode_tok_s": v} for T in (4096, 32768)
            for m, v in (("transformers generate, static cache", 200.0), ("kvcascade full, CUDA graphs", 260.0),
                         ("kvcascade streaming budget 2048, 8 prompts decoded together", 700.0))]
    rows.append({"T": 4096, "method": "transformers generate, dynamic cache", "error": "cannot run here"})
    f = tmp_path / "bench_generate.json"
    f.write_text(json.dumps({"meta": {"device": "test", "model": "m", "new_tokens": 8}, "rows": rows}))
    code, _, err = run(["report", str(f)], capsys)
    png = tmp_path / "bench_generate.png"
    assert code == 0 and png.is_file() and png.stat().st_size > 5000 and str(png) in err
    other = tmp_path / "profile.json"
    other.write_text(json.dumps({"device": "test", "rows": []}))
    code, out, err = run(["report", str(other)], capsys)
    assert code == 2 and err.startswith("kvcascade: error:") and "bench generate" in err and "Traceback" not in err
