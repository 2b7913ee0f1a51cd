"""dume.train.speed: the fast-training switches do what they say on a CPU, and the training
throughput benchmark runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dume.train.speed import (attn_implementation, enable_fast_matmul, make_adamw, maybe_compile,
    model_flops_per_token, peak_flops)

REPO = Path(__file__).resolve().parents[1]


def _tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def test_model_flops_per_token_matches_hand_count():
    cfg = _tiny_config()  # head_dim 8, 2 KV heads (GQA)
    H, I, L, V, T = 32, 64, 2, 300, 16
    per_layer = H * 32 + 2 * H * 16 + 32 * H + 3 * H * I  # q, k, v (2 heads x 8), o, MLP
    n = L * per_layer + H * V  # + lm_head; no input embedding, no norms
    assert per_layer == 9216
    assert model_flops_per_token(cfg, T) == 6 * n + 12 * L * 32 * T == 6 * 28032 + 12288


def test_make_adamw_on_cpu_is_not_fused_and_keeps_weight_decay():
    model = LlamaForCausalLM(_tiny_config())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = make_adamw([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                     lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert not opt.defaults.get("fused")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay), len(no_decay)]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3
    # A bare iterable of tensors becomes one group with AdamW's default weight decay.
    opt2 = make_adamw(model.parameters(), lr=1e-3, device=torch.device("cpu"))
    assert len(opt2.param_groups) == 1 and not opt2.defaults.get("fused")


def test_make_adamw_for_cuda_is_fused_even_before_the_model_moves():
    # The training loop builds the optimizer before accelerate moves the model in place.
    model = torch.nn.Linear(4, 4)
    opt = make_adamw([{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}],
                     lr=1e-3, device="cuda")
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_cpu_gets_sdpa_no_tf32_no_peak():
    assert attn_implementation("cpu") == "sdpa"
    assert attn_implementation(torch.device("cpu")) == "sdpa"
    assert enable_fast_matmul("cpu") == {}
    assert peak_flops("cpu", torch.bfloat16) is None


def test_enable_fast_matmul_cuda_sets_only_the_cuda_backends():
    # The CPU build accepts the CUDA settings, so the CUDA branch runs here; restore them after.
    if not hasattr(torch.backends, "fp32_precision"):
        return  # torch < 2.9: legacy flags, nothing more to check on a CPU
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
              torch.backends.mkldnn.matmul.fp32_precision)
    try:
        got = enable_fast_matmul("cuda")
        assert got == {"cuda.matmul.fp32_precision": "tf32", "cudnn.conv.fp32_precision": "tf32"}
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision == before[2]  # the CPU's matmuls untouched
        assert enable_fast_matmul("cuda", enable=False)["cuda.matmul.fp32_precision"] == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before[:2]


def test_sdpa_and_eager_give_the_same_logits():
    def build(impl):
        torch.manual_seed(0)
        return LlamaForCausalLM(_tiny_config(attn_implementation=impl)).eval()

    eager, sdpa = build("eager"), build("sdpa")
    assert sdpa.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    assert eager.model.layers[0].self_attn.config._attn_implementation == "eager"
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 300, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the masked path too
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask).logits
        b = sdpa(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(b[keep], a[keep], atol=1e-5, rtol=0)


def test_maybe_compile_off_returns_the_model():
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, False) is model


def test_benchmark_runs_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--preset", "micro",
                           "--device", "cpu", "--threads", "1", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.strip().startswith("plain ") for line in lines)
    assert any(line.strip().startswith("optimised ") for line in lines)
    assert "optimised ÷ plain throughput" in proc.stdout
    assert "lm_head / vocabulary cost" in proc.stdout
    doc = json.loads(out.read_text())
    assert set(doc["variants"]) == {"plain", "optimised"}
    assert doc["variants"]["optimised"]["tokens_per_s"] > 0
    assert doc["fused_adamw"] == {"plain": False, "optimised": False}
