"""Router training's options do what they say (issue 22, item 9)."""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from dume.routers.training import set_load_balancing


def _tiny_moe() -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=1,
                        max_position_embeddings=32)
    return MixtralForCausalLM(cfg).eval()


def test_alpha_adds_the_load_balancing_loss_to_the_training_loss():
    """Setting only the config (what train_routers did) leaves the model's own copy of the
    coefficient at 0: the loss did not change with alpha."""
    model = _tiny_moe()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
        set_load_balancing(model, 0.5)
        out = model(input_ids=ids, labels=ids)
        assert out.aux_loss is not None and out.aux_loss > 0
        torch.testing.assert_close(out.loss, plain + 0.5 * out.aux_loss)
        set_load_balancing(model, 0.0)
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain)
