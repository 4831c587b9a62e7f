"""Helpers shared by the benchmark scripts: model shapes, environment record, timing, atomic JSON.

Imported as ``common`` by ``el_speed.py`` and ``gpu_step.py`` (run as scripts from any folder:
Python puts the script's own folder first on ``sys.path``).
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- model shapes (random weights)


def gpt_neo_config(name: str):
    """GPT-Neo configs with the real shapes of EleutherAI's 125M / 1.3B / 2.7B checkpoints."""
    from transformers import GPTNeoConfig

    shapes = {  # hidden, layers, heads (global/local attention alternate, window 256, as released)
        "125m": (768, 12, 12),
        "1.3b": (2048, 24, 16),
        "2.7b": (2560, 32, 20),
    }
    hidden, layers, heads = shapes[name]
    return GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=hidden, num_layers=layers,
                        num_heads=heads, attention_types=[[["global", "local"], layers // 2]], window_size=256,
                        intermediate_size=None, activation_function="gelu_new", bos_token_id=50256,
                        eos_token_id=50256)


def llama2_7b_config():
    """The shapes of Llama-2-7B (no weights are downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_llama_config(vocab: int = 128):
    """A 2-layer Llama for smoke tests (seconds on CPU)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_gpt_neo_config(vocab: int = 128):
    from transformers import GPTNeoConfig

    return GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                        attention_types=[[["global", "local"], 1]], window_size=16, max_position_embeddings=256,
                        intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def random_model(config, device: str, dtype: torch.dtype, seed: int):
    """A causal LM with random weights built directly on ``device`` in ``dtype`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def gpt2_tokenizer(data_dir: Path):
    """The GPT-2 / GPT-Neo BPE tokenizer from the shared data folder, or None if it is not there."""
    folder = Path(data_dir) / "tokenizers" / "gpt2"
    if not (folder / "vocab.json").is_file():
        return None
    from transformers import GPT2Tokenizer

    # transformers 5: vocab=/merges= (the old vocab_file= keywords silently give a one-token tokenizer)
    tokenizer = GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    return tokenizer if len(tokenizer) == 50257 else None


# --------------------------------------------------------------------------- environment and timing


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(result, seconds) of ``fn()``, with the accelerator synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def git_commit() -> dict:
    """HEAD and whether tracked files differ from it (untracked files, e.g. new scripts, are not counted)."""
    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: str, dtype: str) -> dict:
    import transformers

    env = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "git": git_commit(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    from loku.save import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return Path(path)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
