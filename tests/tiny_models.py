"""Tiny causal LMs for tests: random weights, or quickly trained to memorize given sequences."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
)

VOCAB = 97


def make_tiny_model(arch: str = "llama", vocab: int = VOCAB, seed: int = 0, n_ctx: int = 64):
    """A 2-layer model of the named architecture with random weights, float32, eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_ctx,
                          tie_word_embeddings=False)
    elif arch == "gpt_neo":
        cfg = GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                           attention_types=[[["global", "local"], 1]], window_size=16,
                           max_position_embeddings=n_ctx, intermediate_size=64)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=n_ctx)
    elif arch == "phi":
        cfg = PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=n_ctx)
    elif arch == "gemma":
        cfg = GemmaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                          max_position_embeddings=n_ctx)
    elif arch == "gemma3":  # a sliding-window layer (window 6) before a global one
        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=n_ctx,
                               sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    elif arch == "mistral":  # sliding window 6 in every layer
        cfg = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_ctx, sliding_window=6)
    else:
        raise ValueError(arch)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    model = AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


def random_sequences(n: int, length: int, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


def memorize(model, sequences: torch.Tensor, steps: int = 300, lr: float = 1e-2):
    """Train ``model`` in place until it reproduces ``sequences`` greedily; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(input_ids=sequences, labels=sequences)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


WORDS = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, VOCAB)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def texts_of(ids: torch.Tensor) -> list[str]:
    return [" ".join(WORDS[i] for i in row) for row in ids.tolist()]


def write_csv(path, header: list[str], rows) -> None:
    """A CSV file shaped like the shared data's (header row, then rows), parent folders made."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def spy_first_step(monkeypatch, forget_file: str, seen: dict) -> None:
    """Record, at the first micro-batch of the request on ``forget_file``, the model's and the reference's
    logits on its forget and retain batches and the loss parts the trainer computed (before any step)."""
    import loku.trainer as trainer

    real = trainer.batch_loss

    def ids(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def spy(model, reference, forget, retain, cfg):
        out = real(model, reference, forget, retain, cfg)
        if cfg.forget == forget_file and not seen:
            with torch.no_grad():
                seen.update(forget=forget, retain=retain, parts=out[1], model_retain=model(**ids(retain)).logits,
                            reference=reference, ref_forget=reference(**ids(forget)).logits,
                            ref_retain=reference(**ids(retain)).logits)
        return out

    monkeypatch.setattr(trainer, "batch_loss", spy)
