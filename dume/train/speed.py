"""The fast-training switches of a PyTorch LLM loop, each applied only where it is correct.

They change how fast a step runs, never what it computes beyond the rounding each one documents; the training
loop calls them, `bench/train_throughput.py` measures them against a plain fp32 loop. bf16 autocast is not here:
`accelerate` applies it (`mixed_precision="bf16"`), and on a CPU it is usually slower than fp32.
"""

from __future__ import annotations

import torch

__all__ = ["enable_fast_matmul", "make_adamw", "attn_implementation", "maybe_compile",
           "model_flops_per_token", "peak_flops", "PEAK_BF16_FLOPS"]


def _device_type(device) -> str:
    return torch.device(device).type


def enable_fast_matmul(device, enable: bool = True) -> dict:
    """Let fp32 matmuls (cuBLAS) and cuDNN convolutions use TF32 tensor cores on CUDA.

    Returns the settings it made, for the run's log (``{}`` on a CPU). ``enable=False`` sets both to strict IEEE
    fp32, for benchmarks that compare both (torch's default is IEEE for matmuls, TF32 for cuDNN convolutions).

    Why: TF32 keeps fp32's range with a 10-bit mantissa and runs fp32 matmuls several times faster on Ampere and
    later GPUs; training converges the same (the products are rounded, the sums still accumulate in fp32). Under
    bf16 autocast it speeds up the matmuls autocast leaves in fp32.

    Why nothing on a CPU: TF32 is a tensor-core format; CPUs have none. The global switches that sound equivalent
    (``torch.set_float32_matmul_precision("high")``, ``torch.backends.fp32_precision``) also lower oneDNN's fp32
    matmul precision on CPUs that support it, which would change this project's CPU results (the tests compare
    models to 1e-9). So only the CUDA backends are touched.

    API: torch >= 2.9's per-backend ``fp32_precision`` settings (the documented way) when present, else the legacy
    ``allow_tf32`` flags (no warning in torch 2.13, documented as to be deprecated). Caveat (torch 2.13): once the
    new API has set "tf32", *reading* a legacy getter (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.get_float32_matmul_precision()``) raises a RuntimeError (mixed APIs): read the new ``fp32_precision``.
    """
    if _device_type(device) != "cuda":
        return {}
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9
        value = "tf32" if enable else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
        return {"cuda.matmul.fp32_precision": value, "cudnn.conv.fp32_precision": value}
    torch.backends.cuda.matmul.allow_tf32 = enable
    torch.backends.cudnn.allow_tf32 = enable
    return {"cuda.matmul.allow_tf32": enable, "cudnn.allow_tf32": enable}


def make_adamw(param_groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, device="cpu") -> torch.optim.AdamW:
    """AdamW over `param_groups` (an iterable of tensors, or of dicts each with "params" and its own
    "weight_decay", kept as given), fused when `device` is CUDA.

    Why fused on CUDA: the fused kernel does the whole update (moments, bias correction, decoupled weight decay,
    parameter write) in one pass over each tensor instead of the several multi-tensor (foreach) kernels of torch's
    default, saving launches and memory traffic; it is correct for fp32 and bf16 parameters alike (moments in the
    parameter's dtype, as in the default path). It needs floating-point parameters on the GPU only by the first
    `step`, so building the optimizer before `accelerator.prepare` moves the model (in place) still gets it.

    Why not fused on a CPU: torch (>= 2.4) has a CPU fused AdamW, faster there (this 2-core machine, one thread:
    1.5 ms against 6.6-8.3 ms a step for 2.1M parameters, 0.12 s against 0.56-0.85 s for 108M), but it rounds
    differently from the default path (~6e-8 apart after 20 steps, where the foreach and for-loop paths agree
    bitwise). This project's CPU runs and tests reproduce the recorded results bit for bit, so the CPU keeps
    torch's default (foreach or for-loop, whichever torch picks). Weigh that before changing it.
    """
    groups = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in param_groups]
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    params = [p for g in groups for p in g["params"]]
    fused = (_device_type(device) == "cuda" and bool(params)
             and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params))
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def attn_implementation(device) -> str:
    """The `attn_implementation` to build a Hugging Face Llama with.

    "sdpa" (PyTorch's `scaled_dot_product_attention`) by default: on CUDA with bf16/fp16 inputs it dispatches to
    its built-in FlashAttention-2 kernel when there is no padding mask (HF drops an all-ones mask) or to the
    memory-efficient kernel with one, so the T x T score matrix that "eager" materialises (and keeps for the
    backward) is never built; on a CPU it has a fused kernel of its own. Same logits as "eager" up to fp32
    rounding (tests/test_speed.py checks 1e-5).

    "flash_attention_2" only on CUDA when `flash_attn` is importable (as `is_flash_attn_2_available` judges it): it
    also unpads batches that have padding (varlen kernels) instead of computing masked positions. It runs in
    bf16/fp16 only (under bf16 autocast) and is an optional separate build, so nothing requires it.
    """
    if _device_type(device) == "cuda":
        try:
            from transformers.utils import is_flash_attn_2_available
        except ImportError:  # pragma: no cover - very old transformers
            return "sdpa"
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def maybe_compile(model, enabled: bool):
    """`torch.compile(model)` when `enabled`, else `model` itself.

    Off by default: the first steps (tracing and kernel generation) take tens of seconds to minutes and every new
    input shape can recompile; it pays on a GPU over a long run. On a CPU it works (it needs a C++ compiler) but is
    rarely worth it for these sizes. The compiled wrapper shares the parameters; save the original module
    (`dume.train.loop.plain_module`), not the wrapper.
    """
    return torch.compile(model) if enabled else model


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of a Llama `config` at context `seq_len`: 6 N + 12 L d_attn T (PaLM/nanoGPT MFU).

    N: the matmul parameters (per layer q, k, v, o projections and the three MLP matrices, plus the lm_head; not
    the input embedding, a lookup, nor the norms); 6 = 2 FLOPs per multiply-add x (forward + 2 x backward).
    L layers, d_attn = heads x head_dim (the hidden size for Llama), T = `seq_len`: the attention scores QKᵀ and
    the weighted sum AV, counted over the full T x T square as PaLM does (not halved for the causal mask).
    """
    H = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    L = config.num_hidden_layers
    attn = H * heads * head_dim + 2 * H * kv * head_dim + heads * head_dim * H
    mlp = 3 * H * config.intermediate_size
    n = L * (attn + mlp) + H * config.vocab_size  # lm_head
    return float(6 * n + 12 * L * heads * head_dim * seq_len)


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s.
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device, dtype) -> float | None:
    """The dense bf16/fp16 peak FLOP/s of a known GPU (`PEAK_BF16_FLOPS`), else None.

    None for a CPU, an unknown GPU (better no MFU than a wrong one), and fp32 `dtype`: fp32 has no single peak
    (TF32 tensor cores or CUDA cores, depending on the flags). MFU in the PaLM sense is quoted against the bf16
    peak; to compare an fp32 run on the same scale, ask with ``torch.bfloat16``.
    """
    if _device_type(device) != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device).upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_BF16_FLOPS["H100 PCIe"]
        if "SXM" in name or "HBM3" in name:  # the SXM part reports as "NVIDIA H100 80GB HBM3"
            return PEAK_BF16_FLOPS["H100 SXM"]
        return None  # NVL and other variants: not in the table
    if "A100" in name:
        return PEAK_BF16_FLOPS["A100"]
    return None
