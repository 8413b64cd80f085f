#!/usr/bin/python3
"""Independent Qwen2-MoE forward pass in plain PyTorch, the reference for tests/test_moe.cpp.

Written from Hugging Face's Qwen2MoeForCausalLM description, not from the C++ code: eager
attention with repeat_kv GQA, rotate_half RoPE, fp32 RMSNorm; on MoE layers the
Qwen2MoeSparseMoeBlock (softmax router in fp32, top-k, optional renormalization, experts visited
through a one-hot expert mask and index_add_, sigmoid-gated shared expert), elsewhere the dense
SwiGLU MLP; and transformers' load_balancing_loss_func over the concatenated router logits of all
MoE layers, with padding masked out.

Usage: /usr/bin/python3 moe_reference.py DIR   (Debian's python3-torch)

Reads from DIR:
  config.json   Hugging Face Qwen2-MoE config (model_type qwen2_moe)
  weights.pt    {HF parameter name: tensor}
  inputs.pt     {"input_ids": [B, T] int64, "attention_mask": [B, T] 0/1}
Writes DIR/out.pt, a dict:
  "logits"          [B, T, V]
  "aux_loss"        scalar: load_balancing_loss_func(router logits, E, k, attention_mask), no coefficient
  "aux_loss_nomask" scalar: the same for a forward without padding (all-ones mask), and no mask
                    passed to load_balancing_loss_func
  "lm_loss"         scalar: mean next-token cross-entropy over pairs of real tokens
  "total_loss"      lm_loss + router_aux_loss_coef * aux_loss (what Qwen2MoeForCausalLM trains on)
  "grad/<name>"     d total_loss / d weight, for every parameter under ".mlp."
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen2_reference import Reference, next_token_loss  # noqa: E402  (the shared attention stack)


def swiglu(w, prefix, x):
    gate = F.linear(x, w[prefix + "gate_proj.weight"])
    up = F.linear(x, w[prefix + "up_proj.weight"])
    return F.linear(F.silu(gate) * up, w[prefix + "down_proj.weight"])


def is_sparse_layer(cfg, i):
    """Qwen2MoeDecoderLayer's rule."""
    return (i not in (cfg.get("mlp_only_layers") or [])) and cfg["num_experts"] > 0 and \
        (i + 1) % cfg.get("decoder_sparse_step", 1) == 0


def sparse_moe_block(cfg, w, prefix, hidden_states):
    """Qwen2MoeSparseMoeBlock.forward: returns (output [B, T, H], router_logits [B*T, E])."""
    bsz, seq, hidden = hidden_states.shape
    num_experts = cfg["num_experts"]
    top_k = cfg["num_experts_per_tok"]
    hidden_states = hidden_states.view(-1, hidden)
    router_logits = F.linear(hidden_states, w[prefix + "gate.weight"])
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    if cfg.get("norm_topk_prob", False):
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)

    final = torch.zeros((bsz * seq, hidden), dtype=hidden_states.dtype)
    # expert_mask[e, slot, token] = 1 when the token's slot-th choice is expert e.
    expert_mask = F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
    for e in range(num_experts):
        slot, token = torch.where(expert_mask[e])
        if token.numel() == 0:
            continue
        current = hidden_states[token]
        out = swiglu(w, f"{prefix}experts.{e}.", current) * routing_weights[token, slot, None]
        final = final.index_add(0, token, out.to(hidden_states.dtype))

    if cfg.get("shared_expert_intermediate_size", 0) > 0:
        shared = swiglu(w, prefix + "shared_expert.", hidden_states)
        shared = torch.sigmoid(F.linear(hidden_states, w[prefix + "shared_expert_gate.weight"])) * shared
        final = final + shared
    return final.view(bsz, seq, hidden), router_logits


def load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask=None):
    """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6), as in Qwen2-MoE."""
    concatenated = torch.cat(list(gate_logits), dim=0)
    routing_weights = F.softmax(concatenated, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_experts)  # [L*B*T, k, E]
    if attention_mask is None:
        tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
        router_prob_per_expert = torch.mean(routing_weights, dim=0)
    else:
        batch_size, sequence_length = attention_mask.shape
        num_layers = concatenated.shape[0] // (batch_size * sequence_length)
        expert_attention_mask = (
            attention_mask[None, :, :, None, None]
            .expand((num_layers, batch_size, sequence_length, top_k, num_experts))
            .reshape(-1, top_k, num_experts)
        )
        tokens_per_expert = torch.sum(expert_mask.float() * expert_attention_mask, dim=0) / torch.sum(
            expert_attention_mask, dim=0)
        router_mask = (
            attention_mask[None, :, :, None]
            .expand((num_layers, batch_size, sequence_length, num_experts))
            .reshape(-1, num_experts)
        )
        router_prob_per_expert = torch.sum(routing_weights * router_mask, dim=0) / torch.sum(router_mask, dim=0)
    overall = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    return overall * num_experts


class MoeReference(Reference):
    """The dense reference with Qwen2MoeSparseMoeBlock on the sparse layers."""

    def __init__(self, cfg, weights):
        super().__init__(cfg, weights)
        self.router_logits = []

    def feed_forward(self, i, h):
        if not is_sparse_layer(self.cfg, i):
            return swiglu(self.w, f"model.layers.{i}.mlp.", h)
        out, logits = sparse_moe_block(self.cfg, self.w, f"model.layers.{i}.mlp.", h)
        self.router_logits.append(logits)
        return out


def forward(cfg, w, input_ids, attention_mask):
    """Returns (logits [B, T, V], tuple of router logits of the MoE layers)."""
    ref = MoeReference(cfg, w)
    logits = ref.forward(input_ids, attention_mask)
    return logits, tuple(ref.router_logits)


def main(directory):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    assert cfg.get("model_type") == "qwen2_moe", cfg.get("model_type")
    weights = torch.load(os.path.join(directory, "weights.pt"))
    for name, t in weights.items():
        if ".mlp." in name:
            t.requires_grad_(True)
    inputs = torch.load(os.path.join(directory, "inputs.pt"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    logits, router_logits = forward(cfg, weights, ids, mask)
    aux = load_balancing_loss_func(router_logits, cfg["num_experts"], cfg["num_experts_per_tok"], mask)
    with torch.no_grad():  # every position a real token, and no mask given to the loss
        _, unmasked_router_logits = forward(cfg, weights, ids, torch.ones_like(mask))
        aux_nomask = load_balancing_loss_func(unmasked_router_logits, cfg["num_experts"], cfg["num_experts_per_tok"])
    lm_loss = next_token_loss(logits, ids, mask)
    total = lm_loss + cfg.get("router_aux_loss_coef", 0.001) * aux
    total.backward()

    out = {
        "logits": logits.detach(),
        "aux_loss": aux.detach(),
        "aux_loss_nomask": aux_nomask.detach(),
        "lm_loss": lm_loss.detach(),
        "total_loss": total.detach(),
    }
    for name, t in weights.items():
        if t.requires_grad:
            out["grad/" + name] = t.grad if t.grad is not None else torch.zeros_like(t)
    torch.save(out, os.path.join(directory, "out.pt"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: moe_reference.py DIR")
    torch.set_num_threads(1)
    main(sys.argv[1])
