#!/usr/bin/python3
"""Independent Qwen2 forward pass in plain PyTorch, the reference for tests/test_qwen2.cpp.

Written from Hugging Face's Qwen2ForCausalLM description (eager attention, repeat_kv GQA,
rotate_half RoPE, fp32 RMSNorm, SwiGLU MLP) and PEFT's LoRA Linear, not from the C++ code.

Usage: /usr/bin/python3 qwen2_reference.py DIR   (Debian's python3-torch)

Reads from DIR:
  config.json             Hugging Face Qwen2 config
  weights.pt              {HF parameter name: tensor}
  inputs.pt               {"input_ids": [B, T] int64, "attention_mask": [B, T] 0/1}
  adapter_config.json,    optional PEFT LoRA adapter: {PEFT tensor name: tensor}
  adapter.pt
Writes DIR/out.pt, a dict:
  "logits"                [B, T, V] without adapter
  "lora_logits"           [B, T, V] with the adapter (if any)
  "lora_loss"             scalar: mean next-token cross-entropy with the adapter
  "grad/<PEFT name>"      d lora_loss / d adapter tensor
Positions are the count of real tokens before each token (cumsum(mask) - 1, what HF generate()
passes), so a left-padded row sees the positions it would have alone.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    in_dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(in_dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x, n_rep):
    """[B, n_kv, S, D] -> [B, n_kv * n_rep, S, D]: head h reads kv head h // n_rep."""
    b, n_kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


class Reference:
    def __init__(self, cfg, weights, adapter=None, adapter_cfg=None):
        self.cfg = cfg
        self.w = weights
        self.adapter = adapter or {}
        if adapter_cfg:
            r = adapter_cfg["r"]
            alpha = adapter_cfg["lora_alpha"]
            self.lora_scale = alpha / math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha / r

    def linear(self, x, module):
        """module: HF path like 'model.layers.0.self_attn.q_proj'."""
        y = F.linear(x, self.w[module + ".weight"], self.w.get(module + ".bias"))
        a = self.adapter.get("base_model.model." + module + ".lora_A.weight")
        if a is not None:
            b = self.adapter["base_model.model." + module + ".lora_B.weight"]
            y = y + (x @ a.t() @ b.t()) * self.lora_scale
        return y

    def feed_forward(self, i, h):
        """Layer i's MLP on the normed hidden states: down(silu(gate(h)) * up(h)). MoE subclasses override it."""
        p = f"model.layers.{i}.mlp."
        return self.linear(F.silu(self.linear(h, p + "gate_proj")) * self.linear(h, p + "up_proj"), p + "down_proj")

    def forward(self, input_ids, attention_mask):
        cfg = self.cfg
        bsz, seq = input_ids.shape
        n_heads = cfg["num_attention_heads"]
        n_kv = cfg.get("num_key_value_heads", n_heads)
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // n_heads)
        eps = cfg.get("rms_norm_eps", 1e-6)
        theta = cfg.get("rope_theta", 10000.0)

        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = positions[:, :, None].float() * inv_freq[None, None, :]  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()[:, None, :, :]  # [B, 1, T, D]
        sin = emb.sin()[:, None, :, :]

        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        visible = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, T]
        additive = torch.zeros(bsz, 1, seq, seq).masked_fill(~visible, torch.finfo(torch.float32).min)

        x = self.w["model.embed_tokens.weight"][input_ids]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = rms_norm(x, self.w[p + "input_layernorm.weight"], eps)
            q = self.linear(h, p + "self_attn.q_proj").view(bsz, seq, n_heads, head_dim).transpose(1, 2)
            k = self.linear(h, p + "self_attn.k_proj").view(bsz, seq, n_kv, head_dim).transpose(1, 2)
            v = self.linear(h, p + "self_attn.v_proj").view(bsz, seq, n_kv, head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = repeat_kv(k, n_heads // n_kv)
            v = repeat_kv(v, n_heads // n_kv)
            scores = (q @ k.transpose(2, 3)) / math.sqrt(head_dim) + additive
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            attn = (probs @ v).transpose(1, 2).reshape(bsz, seq, n_heads * head_dim)
            x = x + self.linear(attn, p + "self_attn.o_proj")
            h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], eps)
            x = x + self.feed_forward(i, h)
        x = rms_norm(x, self.w["model.norm.weight"], eps)
        head = self.w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else self.w["lm_head.weight"]
        return x @ head.t()


def next_token_loss(logits, input_ids, attention_mask):
    """Mean cross-entropy of predicting token t+1 at t, over pairs where both are real tokens."""
    valid = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    labels = input_ids[:, 1:].masked_fill(~valid, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def main(directory):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    weights = torch.load(os.path.join(directory, "weights.pt"))
    inputs = torch.load(os.path.join(directory, "inputs.pt"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = {}
    with torch.no_grad():
        out["logits"] = Reference(cfg, weights).forward(ids, mask)

    adapter_path = os.path.join(directory, "adapter.pt")
    if os.path.exists(adapter_path):
        with open(os.path.join(directory, "adapter_config.json")) as f:
            adapter_cfg = json.load(f)
        adapter = {k: v.clone().requires_grad_(True) for k, v in torch.load(adapter_path).items()}
        logits = Reference(cfg, weights, adapter, adapter_cfg).forward(ids, mask)
        loss = next_token_loss(logits, ids, mask)
        loss.backward()
        out["lora_logits"] = logits.detach()
        out["lora_loss"] = loss.detach()
        for name, tensor in adapter.items():
            out["grad/" + name] = tensor.grad
    torch.save(out, os.path.join(directory, "out.pt"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: qwen2_reference.py DIR")
    torch.set_num_threads(1)
    main(sys.argv[1])
