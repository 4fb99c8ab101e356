"""Tiny random-weight models of the real architectures, and helpers shared by the tests."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels (where triton is installed) run in its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ["llama", "qwen2", "mistral", "gemma3"]


def tiny_model(arch: str, seed: int = 0, layers: int = 3):
    """A random-weight float32 model of ``arch`` small enough for CPU tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=8,
                               layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"]))
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.float().eval()


@torch.no_grad()
def reference_logits(model, ids):
    """Logits of the stock model (its own eager attention, its own cache), all positions."""
    model.set_attn_implementation("eager")
    return model(input_ids=ids).logits


@torch.no_grad()
def run_chunks(model, cache, ids, chunk):
    """Feed ``ids`` through ``model`` with ``cache`` in chunks; return all logits."""
    outs = []
    n = ids.shape[1]
    for s in range(0, n, chunk):
        part = ids[:, s:s + chunk]
        cache.final_chunk = s + chunk >= n
        out = cache.forward(model, part)
        outs.append(out.logits)
    return torch.cat(outs, dim=1)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def make_tiny_tokenizer(path):
    """A word-level tokenizer saved as a Hugging Face tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(60)] + list("0123456789") + [
        "the", "pass", "key", "is", "grass", "green", "sky", "blue", ".", "?"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny qwen2 model directory with a tokenizer, loadable by ``kvcascade.load_model``."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_tiny_tokenizer(path)
    model = tiny_model("qwen2")
    model.config.eos_token_id = 1
    model.save_pretrained(str(path))
    return path
