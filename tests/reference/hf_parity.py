#!/usr/bin/env python3
"""fedmoe against Hugging Face transformers + peft, on the kit tests/test_hf_kit.cpp writes.

Usage:
  build/tests/test_model "[hf-kit]"   with FEDMOE_HF_KIT=KIT   (writes the kit, on any machine)
  python3 tests/reference/hf_parity.py KIT [RESULT.json]       (needs transformers + peft; GPU optional)

For each case in KIT (dense-tied, dense-untied-rslora, moe), loads KIT/CASE/model with
AutoModelForCausalLM and KIT/CASE/adapter with PeftModel, on the CPU in fp32 and, when CUDA is there,
on the GPU in fp32 (TF32 off) and bf16, and compares with KIT/CASE/expected.safetensors (fedmoe's):
  logits, lora_logits     at real (non-padding) positions; fp32 tolerance 1e-4 absolute
  lora_loss, grad/<name>  next-token loss with the adapter and d loss / d LoRA tensor (PEFT names)
  greedy, lora_greedy     12 greedy tokens after row 0 (must be identical)
  bf16_logits             fedmoe's bf16 model, against HF's bf16 on the GPU: reported, with HF's own
                          bf16-vs-fp32 error beside it for scale (no pass/fail: rounding differs)
Position ids are passed as cumsum(mask) - 1 (fedmoe's default, what HF generate() derives), so
left-padded rows match. Exit status 1 when any fp32 comparison fails.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

TOL = 1e-4


def next_token_loss(logits, ids, mask):
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    labels = ids[:, 1:].masked_fill(~valid, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def load_model(path, dtype, device):
    from transformers import AutoModelForCausalLM
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager")
    return m.to(device).eval()


def greedy(model, prompt, n):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].cpu()


def run_case(case_dir, device, dtype):
    from peft import PeftModel
    exp = load_file(os.path.join(case_dir, "expected.safetensors"))
    ids, mask = exp["input_ids"].to(device), exp["attention_mask"].to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = exp["attention_mask"].bool()
    res = {}

    base = load_model(os.path.join(case_dir, "model"), dtype, device)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().cpu()
    res["logits_max_abs"] = logits[real].abs().max().item()
    if dtype == torch.float32:
        res["logits_err"] = (logits[real] - exp["logits"][real]).abs().max().item()
        res["greedy_equal"] = torch.equal(greedy(base, ids[:1], 12), exp["greedy"])
    else:
        res["bf16_vs_fedmoe_bf16_err"] = (logits[real] - exp["bf16_logits"][real]).abs().max().item()
        res["bf16_vs_fedmoe_fp32_err"] = (logits[real] - exp["logits"][real]).abs().max().item()
        res["fedmoe_bf16_vs_fp32_err"] = (exp["bf16_logits"][real] - exp["logits"][real]).abs().max().item()

    model = PeftModel.from_pretrained(base, os.path.join(case_dir, "adapter"), is_trainable=True).to(device).eval()
    lora_logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    if dtype == torch.float32:
        res["lora_logits_err"] = (lora_logits.detach().float().cpu()[real] - exp["lora_logits"][real]).abs().max().item()
        loss = next_token_loss(lora_logits, ids, mask)
        loss.backward()
        res["lora_loss_err"] = abs(loss.item() - exp["lora_loss"].item())
        grad_err, grad_max, matched = 0.0, 0.0, 0
        for name, p in model.named_parameters():
            if "lora_" not in name:
                continue
            key = "grad/" + name.replace(".default", "")
            ref = exp[key]
            grad_err = max(grad_err, (p.grad.float().cpu() - ref).abs().max().item())
            grad_max = max(grad_max, ref.abs().max().item())
            matched += 1
        res["lora_grad_err"], res["lora_grad_max_abs"] = grad_err, grad_max
        res["lora_tensors"] = matched
        res["lora_tensors_expected"] = sum(1 for k in exp if k.startswith("grad/"))
        with torch.no_grad():
            res["lora_greedy_equal"] = torch.equal(greedy(model, ids[:1], 12), exp["lora_greedy"])
        res["pass"] = (res["logits_err"] < TOL and res["lora_logits_err"] < TOL and res["lora_loss_err"] < 1e-5 and
                       res["lora_grad_err"] < TOL and res["greedy_equal"] and res["lora_greedy_equal"] and
                       res["lora_tensors"] == res["lora_tensors_expected"])
    return res


def main(kit, out_path):
    import peft
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "date": time.strftime("%Y-%m-%d"), "tolerance": TOL, "cases": {}}
    runs = [("cpu-fp32", "cpu", torch.float32)]
    if torch.cuda.is_available():
        runs += [("cuda-fp32", "cuda", torch.float32), ("cuda-bf16", "cuda", torch.bfloat16)]
    ok = True
    for case in sorted(os.listdir(kit)):
        case_dir = os.path.join(kit, case)
        if not os.path.isfile(os.path.join(case_dir, "expected.safetensors")):
            continue
        report["cases"][case] = {}
        for label, device, dtype in runs:
            try:
                r = run_case(case_dir, device, dtype)
            except Exception as e:  # one broken case must not hide the others
                r = {"error": f"{type(e).__name__}: {e}", "pass": False}
            report["cases"][case][label] = r
            ok = ok and r.get("pass", True)
            print(f"{case:22s} {label:9s} " + " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    report["pass"] = ok
    text = json.dumps(report, indent=2, sort_keys=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
    print("hf parity:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
