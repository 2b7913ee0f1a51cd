"""The statistics collectors, by kind."""

from __future__ import annotations

from dume.errors import DumeError
from dume.stats.oracle import collect_statistics


def collect_for(kind: str, expert_dirs, domains, docs, tokenizer, *, moe_dir=None, solve_layer=None, k: int = 1,
                **common):
    """The statistics a strategy's `statistics` kind names (dume.routers.registry):

    - "dume": one pass through the oracles (`collect_statistics`, the paper's Eq. 7);
    - "loss_aware": the same A, targets from the experts' token losses (`dume.stats.loss_aware`);
    - "sequential": layer by layer through the MoE at `moe_dir`, the earlier layers routed by the gates
      `solve_layer` makes of each layer's sums (`dume.routers.closed_form.layer_solver` is DUME's), top-k = `k`.
    `common` is what every collector takes (num_dume_tokens, max_len, batch_size, device, dtype,
    model_fingerprint, data_source, extra_meta, max_batches, log)."""
    if kind == "dume":
        return collect_statistics(expert_dirs, domains, docs, tokenizer, **common)
    if kind == "loss_aware":
        from dume.stats.loss_aware import collect_loss_aware_statistics

        return collect_loss_aware_statistics(expert_dirs, domains, docs, tokenizer, **common)
    if kind == "sequential":
        from dume.stats.sequential import collect_sequential_statistics

        if moe_dir is None or solve_layer is None:
            raise DumeError("layer-sequential statistics need the MoE (moe_dir) and a router solver (solve_layer)")
        return collect_sequential_statistics(moe_dir, domains, docs, tokenizer, solve_layer=solve_layer, k=k,
                                             **common)
    raise DumeError(f"unknown statistics kind {kind!r}: dume, loss_aware or sequential")
