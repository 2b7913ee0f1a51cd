"""A data-free router from the experts' weights (after Arrow routing for LoRA libraries, Ostapenko et al. 2024).

What fine-tuning changed in expert e's MLP at layer l is ΔW_e = W_e − mean_j W_j, taken over its input-side
projections (gate and up, stacked: [2I, H]). The input direction that change responds to most is ΔW_e's top right
singular vector v_e (unit, in the hidden space the router sees). Arrow scores a token by |v_e·x|; a stock Mixtral
or Qwen3-MoE router is linear, so the sign is fixed instead: v_e points where expert e's gate projection opens
more than the average expert's, i.e. sum_i (ΔW_gate,e v_e)_i > 0. Row e of layer l's router is v_e / T.
"""

from __future__ import annotations

import torch

from dume.errors import DumeError


@torch.no_grad()
def weight_gates(expert_dirs, temperature: float = 1.0) -> list[torch.Tensor]:
    """[D, H] float32 router weights per layer from the experts' MLP weights."""
    from dume.checkpoint.experts import check_experts
    from dume.routers.closed_form import _temperature

    T = _temperature(temperature)
    es = check_experts(expert_dirs).split_fused()
    arch, L = es.arch, es.config.num_hidden_layers
    readers = es.readers()
    try:
        gates = []
        for layer in range(L):
            names = [arch.dense_mlp_name(layer, p) for p in ("gate_proj", "up_proj")]
            per_expert = [torch.cat([rd.get(n).double() for n in names]) for rd in readers]  # [2I, H] each
            mean = torch.stack(per_expert).mean(dim=0)
            rows = []
            for e, W in enumerate(per_expert):
                delta = W - mean
                if not bool(delta.abs().max() > 0):
                    raise DumeError(f"expert {e} ({es.dirs[e]}) has the same layer-{layer} MLP as the average of "
                                    "the experts: its weights give no direction to route by")
                v = torch.linalg.svd(delta, full_matrices=False).Vh[0]
                gate_rows = delta[: delta.shape[0] // 2]
                if float((gate_rows @ v).sum()) < 0:
                    v = -v
                rows.append(v / T)
            gates.append(torch.stack(rows).to(torch.float32).contiguous())
        return gates
    finally:
        for rd in readers:
            rd.close()
