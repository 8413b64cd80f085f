#!/usr/bin/python3
"""The Python side of bench/model_bench: the same Qwen2 + LoRA workloads in plain eager PyTorch.

Run by model_bench as a child process with Debian's python3-torch (/usr/bin/python3), which sits on
the same LibTorch 1.13 + OpenBLAS as the C++ side, so the comparison is between the two frontends
and model code, not between libraries:

  /usr/bin/python3 bench/model_bench.py --json [--serve] --threads 2 --hidden 512 --layers 8 ...

Without --serve it runs every section once and prints one JSON object on stdout:
  {"threads": N, "openblas_threads": M, "matmul_gflops": {"512": x, "2048": y},
   "train": {"tokens_per_s": ..., "step_s": [...], "loss": ...},
   "generate": {"tokens_per_s": ..., "total_s": ..., "prefill_s": ..., "tokens": [...]}}
With --serve it reads one command per line on stdin and answers each with one JSON line, so that
model_bench can alternate C++ and Python measurements step by step (the machine is shared, and a
burst of load then hits both sides):
  info                 {"threads", "openblas_threads", "torch"}
  matmul N SECONDS     {"gflops"}
  train                one optimizer step: {"s", "loss"} (the first call builds the optimizer)
  generate             one greedy generation: {"total_s", "prefill_s", "tokens"}
  quit

The model is written here as an ordinary nn.Module in the style of Hugging Face's eager Qwen2
(repeat_kv GQA, rotate_half RoPE, fp32 RMSNorm and softmax, SwiGLU MLP, tied LM head) with PEFT-style
LoRA Linear branches, and an ordinary training loop: forward, cross-entropy, backward, gradient
clipping at 1.0, AdamW step, loss.item() -- what fedmoe's Trainer does per step. Generation keeps a
per-layer KV cache (torch.cat per step, as HF's DynamicCache) and computes the LM head only for the
last position (HF's logits_to_keep=1), greedy.
"""
import argparse
import ctypes
import json
import os
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    def __init__(self, a):
        self.hidden = a.hidden
        self.layers = a.layers
        self.heads = a.heads
        self.kv_heads = a.kv_heads
        self.head_dim = a.hidden // a.heads
        self.intermediate = a.intermediate
        self.vocab = a.vocab
        self.eps = 1e-6
        self.theta = 1e6


class LoraLinear(nn.Module):
    """y = x W^T + b (+ scale * B(A x)) -- PEFT's LoRA Linear without dropout."""

    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in).normal_(0.0, 0.02), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_out), requires_grad=False) if bias else None
        self.lora_A = None
        self.lora_B = None
        self.scale = 1.0

    def add_lora(self, r, alpha):
        a = torch.empty(r, self.weight.shape[1])
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.weight.shape[0], r))
        self.scale = alpha / r

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x, n_rep):
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.q_proj = LoraLinear(c.hidden, c.heads * c.head_dim, True)
        self.k_proj = LoraLinear(c.hidden, c.kv_heads * c.head_dim, True)
        self.v_proj = LoraLinear(c.hidden, c.kv_heads * c.head_dim, True)
        self.o_proj = LoraLinear(c.heads * c.head_dim, c.hidden, False)

    def forward(self, x, cos, sin, mask, cache):
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache[0] is not None:
                k = torch.cat((cache[0], k), dim=2)
                v = torch.cat((cache[1], v), dim=2)
            cache[0], cache[1] = k, v
        k = repeat_kv(k, c.heads // c.kv_heads)
        v = repeat_kv(v, c.heads // c.kv_heads)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(c.head_dim)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, c.heads * c.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = LoraLinear(c.hidden, c.intermediate, False)
        self.up_proj = LoraLinear(c.hidden, c.intermediate, False)
        self.down_proj = LoraLinear(c.intermediate, c.hidden, False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Parameter(torch.empty(c.vocab, c.hidden).normal_(0.0, 0.02), requires_grad=False)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.layers)])
        self.norm = RMSNorm(c.hidden, c.eps)
        inv = 1.0 / (c.theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def add_lora(self, r, alpha, targets):
        for layer in self.layers:
            for name in targets:
                module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
                module.add_lora(r, alpha)

    def forward(self, ids, cache=None, logits_to_keep=0):
        b, t = ids.shape
        past = cache[0][0].shape[2] if cache is not None and cache[0][0] is not None else 0
        pos = torch.arange(past, past + t)
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, T, D]
        mask = None
        if t > 1:  # causal; a single new token sees every cached key
            s = past + t
            blocked = torch.arange(s)[None, :] > torch.arange(past, s)[:, None]
            mask = torch.zeros(t, s).masked_fill(blocked, torch.finfo(torch.float32).min)[None, None]
        x = F.embedding(ids, self.embed_tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None)
        x = self.norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return F.linear(x, self.embed_tokens)  # tied head


def openblas_threads():
    """OpenBLAS's own pool size (it ignores torch.set_num_threads), or -1 without OpenBLAS."""
    try:
        return ctypes.CDLL("libopenblas.so.0").openblas_get_num_threads()
    except (AttributeError, OSError):
        return -1


def matmul_gflops(n, seconds=1.0):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and reps >= 3:
            return 2.0 * n ** 3 * reps / elapsed / 1e9


class Bench:
    def __init__(self, a):
        self.a = a
        torch.manual_seed(0)
        self.model = Qwen2ForCausalLM(Config(a))
        self.model.add_lora(a.rank, a.alpha, a.targets.split(","))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = None
        g = torch.Generator().manual_seed(1)
        seq = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        self.ids, self.labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        g = torch.Generator().manual_seed(2)
        self.prompt = torch.randint(0, a.vocab, (1, a.prompt), generator=g)

    def train_step(self):
        """One optimizer step on the fixed batch: {"s": seconds, "loss": value}."""
        model = self.model
        model.train()
        if self.opt is None:
            self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        start = time.perf_counter()
        self.opt.zero_grad()
        logits = model(self.ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.labels.reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        value = loss.item()
        return {"s": time.perf_counter() - start, "loss": value}

    def generate(self):
        """One greedy generation of new_tokens after the prompt: {"total_s", "prefill_s", "tokens"}."""
        model, a = self.model, self.a
        model.eval()
        with torch.no_grad():
            cache = [[None, None] for _ in range(model.c.layers)]
            tokens = []
            start = time.perf_counter()
            logits = model(self.prompt, cache, logits_to_keep=1)
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            prefill = time.perf_counter() - start
            while len(tokens) < a.new_tokens:
                logits = model(torch.tensor([[token]]), cache, logits_to_keep=1)
                token = int(logits[0, -1].argmax())
                tokens.append(token)
            return {"total_s": time.perf_counter() - start, "prefill_s": prefill, "tokens": tokens}


def info(a):
    return {"threads": torch.get_num_threads(), "openblas_threads": openblas_threads(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}


def run_once(a, skip):
    out = info(a)
    if "matmul" not in skip:
        out["matmul_gflops"] = {str(n): matmul_gflops(n, a.matmul_seconds) for n in (512, 2048)}
    bench = Bench(a)
    if "train" not in skip:
        steps = [bench.train_step() for _ in range(a.warmup + a.steps)][a.warmup:]
        times = [s["s"] for s in steps]
        out["train"] = {"tokens_per_s": a.batch * a.seq * len(times) / sum(times), "step_s": times,
                        "loss": steps[-1]["loss"]}
    if "generate" not in skip:
        runs = [bench.generate() for _ in range(a.gen_reps + 1)][1:]  # the first warms up
        best = min(runs, key=lambda r: r["total_s"])
        best["tokens_per_s"] = a.new_tokens / best["total_s"]
        out["generate"] = best
    print(json.dumps(out))


def serve(a):
    import sys
    bench = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "quit":
            break
        if cmd == "info":
            reply = info(a)
        elif cmd == "matmul":
            reply = {"gflops": matmul_gflops(int(words[1]), float(words[2]))}
        elif cmd in ("setup", "train", "generate"):
            if bench is None:
                bench = Bench(a)
            reply = {"ok": True} if cmd == "setup" else bench.train_step() if cmd == "train" else bench.generate()
        else:
            reply = {"error": "unknown command " + cmd}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    p.add_argument("--serve", action="store_true", help="answer commands on stdin, one JSON line each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-reps", type=int, default=2)
    p.add_argument("--matmul-seconds", type=float, default=1.0)
    p.add_argument("--skip", default="", help="without --serve: comma list of sections to skip (matmul,train,generate)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.serve:
        serve(a)
    else:
        run_once(a, set(filter(None, a.skip.split(","))))


if __name__ == "__main__":
    main()
