"""Trains `demo-lm`, a small GPT-style decoder, on the King James Bible and
exports it to ONNX with a KV cache.

Build-time only (needs torch, tokenizers, onnx, onnxscript); serving never
imports torch. Reproducible: fixed seed, fixed steps, the corpus from
Debian's `bible-kjv` package (`bible -f "Gen1:1-Rev22:21"`).

    python -m tools.models.demo_lm --out models/demo-lm/1

Writes model.onnx, tokenizer.json and config.json. The ONNX graph:

    inputs : input_ids [B,S] int64, attention_mask [B,P+S] int64,
             position_ids [B,S] int64, past_key_values.{i}.key/value [B,H,P,D] float32
    outputs: logits [B,S,V] float32, present.{i}.key/value [B,H,P+S,D] float32
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class GPTConfig:
    """GPTConfig is the architecture of demo-lm."""

    vocab_size: int = 4096
    context_length: int = 512
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256


def corpus_text() -> str:
    """Returns the King James Bible from Debian's bible-kjv package."""
    result = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    )
    return result.stdout


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """Trains a byte-level BPE tokenizer with one special token (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tokenizer


def build_model(config: GPTConfig) -> Any:
    """Returns the torch module (imported lazily: torch is build-time only)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(config.d_model)
            self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
            self.proj = nn.Linear(config.d_model, config.d_model)
            self.ln2 = nn.LayerNorm(config.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(config.d_model, 4 * config.d_model),
                nn.GELU(approximate="tanh"),
                nn.Linear(4 * config.d_model, config.d_model),
            )

        def forward(self, x, bias, past_k, past_v):
            b, s, d = x.shape
            h = config.n_head
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q = q.view(b, s, h, d // h).transpose(1, 2)
            k = torch.cat([past_k, k.view(b, s, h, d // h).transpose(1, 2)], dim=2)
            v = torch.cat([past_v, v.view(b, s, h, d // h).transpose(1, 2)], dim=2)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h)) + bias
            y = torch.softmax(scores, dim=-1) @ v
            x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
            return x + self.mlp(self.ln2(x)), k, v

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(config.vocab_size, config.d_model)
            self.wpe = nn.Embedding(config.context_length, config.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.apply(self._init)

        @staticmethod
        def _init(module):
            # GPT-2 initialisation: without it the tied output layer starts with
            # huge logits (loss ~16 instead of ln(vocab) ~8.3).
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

        def forward(self, input_ids, attention_mask, position_ids, *past):
            b, s = input_ids.shape
            total = attention_mask.shape[1]
            # Causal over the whole (past + new) sequence, and padding masked out.
            query_pos = torch.arange(s, device=input_ids.device) + (total - s)
            key_pos = torch.arange(total, device=input_ids.device)
            allowed = (key_pos[None, :] <= query_pos[:, None])[None, None, :, :]
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
            bias = torch.where(allowed, 0.0, -1e9)
            x = self.wte(input_ids) + self.wpe(position_ids)
            presents = []
            for i, block in enumerate(self.blocks):
                x, k, v = block(x, bias, past[2 * i], past[2 * i + 1])
                presents += [k, v]
            logits = self.ln_f(x) @ self.wte.weight.T  # tied embeddings
            return (logits, *presents)

    return GPT()


def _empty_past(config: GPTConfig, batch: int, length: int) -> list[Any]:
    import torch

    head = config.d_model // config.n_head
    shape = (batch, config.n_head, length, head)
    return [torch.zeros(shape) for _ in range(2 * config.n_layer)]


def train(model: Any, ids: Any, config: GPTConfig, steps: int, batch: int, seq: int) -> float:
    """Trains on random windows; returns the final validation loss."""
    import torch

    torch.manual_seed(0)
    split = int(len(ids) * 0.95)
    train_ids, val_ids = ids[:split], ids[split:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05
    )
    mask = torch.ones(batch, seq, dtype=torch.long)
    positions = torch.arange(seq).expand(batch, seq)
    past = _empty_past(config, batch, 0)
    started = time.monotonic()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,))
        x = torch.stack([train_ids[i : i + seq] for i in starts])
        y = torch.stack([train_ids[i + 1 : i + seq + 1] for i in starts])
        logits = model(x, mask, positions, *past)[0]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, config.vocab_size), y.reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            print(
                f"step {step}/{steps} loss {loss.item():.3f} ({time.monotonic() - started:.0f}s)",
                flush=True,
            )
    return evaluate(model, val_ids, config, seq)


def evaluate(model: Any, ids: Any, config: GPTConfig, seq: int) -> float:
    """Returns the mean loss over consecutive validation windows."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - seq - 1, seq * 4)[:32]:
            x = ids[start : start + seq][None]
            y = ids[start + 1 : start + seq + 1][None]
            logits = model(
                x,
                torch.ones(1, seq, dtype=torch.long),
                torch.arange(seq)[None],
                *_empty_past(config, 1, 0),
            )[0]
            losses.append(torch.nn.functional.cross_entropy(logits[0], y[0]).item())
    return sum(losses) / len(losses)


def export(model: Any, config: GPTConfig, path: Path) -> None:
    """Exports to ONNX with dynamic batch, sequence and past axes."""
    import torch
    from torch.export import Dim

    model.eval()
    batch, seq, past_len = 2, 3, 5  # sizes of 0 or 1 would be frozen by the exporter
    inputs = (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
        *_empty_past(config, batch, past_len),
    )
    b = Dim("batch", min=1, max=256)
    s = Dim("seq", min=1, max=config.context_length)
    p = Dim("past", min=0, max=config.context_length)
    total = Dim("total", min=1, max=2 * config.context_length)
    past_shapes = tuple({0: b, 2: p} for _ in range(2 * config.n_layer))
    names = [f"past_key_values.{i}.{kv}" for i in range(config.n_layer) for kv in ("key", "value")]
    outputs = ["logits"] + [
        f"present.{i}.{kv}" for i in range(config.n_layer) for kv in ("key", "value")
    ]
    program = torch.onnx.export(
        model,
        inputs,
        dynamo=True,
        input_names=["input_ids", "attention_mask", "position_ids", *names],
        output_names=outputs,
        dynamic_shapes=({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, past_shapes),
        optimize=True,
    )
    assert program is not None, "the dynamo exporter returns a program"
    program.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.models.demo_lm")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = GPTConfig()
    text = corpus_text()
    tokenizer = train_tokenizer(text, config.vocab_size)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    print(f"corpus: {len(text)} chars, {len(ids)} tokens", flush=True)
    model = build_model(config)
    val_loss = train(model, ids, config, args.steps, args.batch, args.seq)
    print(f"validation loss {val_loss:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    export(model, config, args.out / "model.onnx")
    card = {
        "architecture": "gpt-kv",
        "kind": "generative",
        "description": "demo-lm: a 4.3M-parameter GPT trained briefly on the King James Bible.",
        "context_length": config.context_length,
        "eos_token": EOS,
        "eos_token_id": tokenizer.token_to_id(EOS),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "head_dim": config.d_model // config.n_head,
        "vocab_size": config.vocab_size,
        "defaults": {"max_tokens": 64, "temperature": 0.8, "top_p": 0.95, "top_k": 50},
        "training": {
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "validation_loss": round(val_loss, 3),
            "config": asdict(config),
        },
    }
    (args.out / "config.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
