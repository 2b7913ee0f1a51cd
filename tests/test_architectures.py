"""MoErging works for every architecture in dume.arch.table, on tiny experts saved the
way the hub ships them: Llama with llama3 rope scaling, tied embeddings and GQA; Mistral
with a sliding window; Qwen3 with tied embeddings, q/k norms and an explicit head_dim.

- identical experts: the MoE's logits equal the expert's on a 600-token sequence;
- experts that differ in their MLPs only: the MoE with every router forced to expert e
  equals expert e (the routing is the only thing the MoE adds);
- the written tensor names are exactly those the MoE class's save_pretrained writes, and
  the output loads with AutoModelForCausalLM and generates.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from dume.errors import DumeError

SEQ = 600
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=rope, tie_word_embeddings=True))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=128, rope_theta=1e6, head_dim=8))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True, rope_theta=1e6))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2))


BUILDERS = {"llama": (_llama, "MixtralForCausalLM"), "mistral": (_mistral, "MixtralForCausalLM"),
            "qwen3": (_qwen3, "Qwen3MoeForCausalLM"), "phi3": (_phi3, "MixtralForCausalLM")}


def _experts(kind, tmp_path, n=3, same=False):
    """n experts from one seed model; unless `same`, each MLP perturbed differently."""
    torch.manual_seed(0)
    base = BUILDERS[kind][0]().eval()
    dirs = []
    for e in range(n):
        model = BUILDERS[kind][0]().eval()
        model.load_state_dict(base.state_dict())
        if not same:
            g = torch.Generator().manual_seed(e + 1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".mlp." in name:
                        p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"e{e}")
        dirs.append(tmp_path / f"e{e}")
    return dirs


def _ids():
    return torch.randint(0, TINY["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))


def _logits(path_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else \
        AutoModelForCausalLM.from_pretrained(str(path_or_model), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def _gates(n_layers, n_experts, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_experts, hidden, generator=g) for _ in range(n_layers)]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_identical_experts_give_the_experts_logits(kind, tmp_path):
    from dume.moe.merge import moerge_experts

    dirs = _experts(kind, tmp_path, same=True)
    moe = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32))
    ids = _ids()
    delta = (_logits(moe, ids) - _logits(dirs[0], ids)).abs().max().item()
    assert delta < 1e-4, delta


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_forced_routing_gives_each_expert(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from dume.moe.merge import moerge_experts

    dirs = _experts(kind, tmp_path)
    moe_dir = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32))
    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32).eval()
    assert type(model).__name__ == BUILDERS[kind][1]
    ids = _ids()[:, :200]
    routed = _logits(model, ids)
    for e, d in enumerate(dirs):
        def force(module, args, out, e=e):
            logits, _, idx = out
            return logits, torch.ones_like(idx, dtype=logits.dtype), torch.full_like(idx, e)

        hooks = [layer.mlp.gate.register_forward_hook(force) for layer in model.model.layers]
        try:
            forced = _logits(model, ids)
        finally:
            for h in hooks:
                h.remove()
        expert = _logits(d, ids)
        assert (forced - expert).abs().max().item() < 1e-4, e
        assert (routed - expert).abs().max().item() > 1e-3  # the routers do choose between experts


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_written_names_and_config_are_the_moe_classes_own(kind, tmp_path):
    import transformers

    from dume.checkpoint.reader import load_config
    from dume.moe.merge import moe_config, moerge_experts

    dirs = _experts(kind, tmp_path)
    moe = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32), num_experts_per_tok=2)
    cfg = moe_config(load_config(dirs[0], kind), 3, 2)
    getattr(transformers, BUILDERS[kind][1])(cfg).save_pretrained(tmp_path / "ref")
    names = {}
    for which in ("moe", "ref"):
        with safe_open(tmp_path / which / "model.safetensors", "pt") as f:
            names[which] = set(f.keys())
    assert names["moe"] == names["ref"]
    saved = load_config(moe, ("mixtral", "qwen3_moe"))
    dense = load_config(dirs[0], kind)
    for field in ("rope_parameters", "head_dim", "num_key_value_heads", "tie_word_embeddings", "sliding_window"):
        assert getattr(saved, field, None) == getattr(dense, field, None), field
    model = transformers.AutoModelForCausalLM.from_pretrained(str(moe))
    out = model.generate(_ids()[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def test_unsupported_architectures_are_refused_with_the_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dume.checkpoint.experts import check_experts

    for i in range(2):
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / f"g{i}")
    with pytest.raises(DumeError, match="not supported; supported architectures: LlamaForCausalLM"):
        check_experts([tmp_path / "g0", tmp_path / "g1"])


def test_mixed_architectures_are_refused(tmp_path):
    from dume.checkpoint.experts import check_experts

    torch.manual_seed(0)
    _llama().save_pretrained(tmp_path / "a")
    _qwen3().save_pretrained(tmp_path / "b")
    with pytest.raises(DumeError, match="model_type is 'qwen3', expected 'llama'"):
        check_experts([tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_editing_a_moe_works_for_every_architecture(kind, tmp_path):
    """dume.moe.edit reads the same records: a MoE of experts 0, 1 extended with expert 2
    equals the MoE of all three (routers given), dropping expert 0 equals the MoE of 1, 2,
    and "shared weights + expert e" read back from the MoE equals the oracle of e."""
    from transformers import AutoModelForCausalLM

    from dume.arch.table import architecture
    from dume.moe.merge import build_oracle_model, moerge_experts
    from dume.moe.edit import (build_dense_from_moe, drop_experts, expert_mlp_state_dict, extend_moe,
        moe_shared_state_dict)

    dirs = _experts(kind, tmp_path)
    gates3 = _gates(2, 3, 32)
    full = moerge_experts(dirs, tmp_path / "full", gates=gates3)
    two = moerge_experts(dirs[:2], tmp_path / "two", gates=[g[:2] for g in gates3], weights=None)
    # keep-shared: the extended MoE keeps the two-expert average, so compare it with a MoE
    # of all three whose shared tensors are that average (weights 1, 1, 0)
    ref = moerge_experts(dirs, tmp_path / "ref", gates=gates3, weights=[1, 1, 0])
    extended = extend_moe(two, [dirs[2]], tmp_path / "extended", gates=gates3)
    ids = _ids()[:, :100]
    assert (_logits(extended, ids) - _logits(ref, ids)).abs().max().item() < 1e-5
    dropped = drop_experts(full, [0], tmp_path / "dropped", gates=[g[1:] for g in gates3])
    assert type(AutoModelForCausalLM.from_pretrained(str(dropped))).__name__ == BUILDERS[kind][1]
    for new, old in ((0, 1), (1, 2)):
        a, b = expert_mlp_state_dict(dropped, new), expert_mlp_state_dict(full, old)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert moe_shared_state_dict(dropped).keys() == moe_shared_state_dict(full).keys()
    for e in range(3):
        dense = build_dense_from_moe(full, e)
        oracle = build_oracle_model(dirs, e, dtype=torch.float32)
        if not architecture(oracle.config.model_type).split:  # fused experts read back unfused (as Llama)
            assert type(dense).__name__ == type(oracle).__name__
        assert (_logits(dense, ids) - _logits(oracle, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_streamed_moe_load_equals_from_pretrained(kind, tmp_path):
    """load_moe_streamed (the build's low-memory load) gives exactly the model
    from_pretrained gives: every parameter and buffer, ties, and the logits."""
    from transformers import AutoModelForCausalLM

    from dume.moe.merge import moerge_experts
    from dume.moe.edit import load_moe_streamed

    dirs = _experts(kind, tmp_path)
    moe = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32))
    ref = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32).eval()
    got = load_moe_streamed(moe)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    buffers = dict(got.named_buffers())
    for n, buf in ref.named_buffers():
        assert torch.equal(buf, buffers[n]), n
    if ref.config.tie_word_embeddings:
        assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    ids = _ids()[:, :100]
    assert torch.equal(_logits(ref, ids), _logits(got, ids))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_streamed_routing_shares_equal_the_loaded_models(kind, tmp_path):
    """The held-out routing check runs the MoE one decoder layer at a time from the checkpoint
    (`streamed_routing_shares`, issue 23: it held the whole MoE); its shares equal `routing_shares` of the
    loaded model, on domains of different lengths with padding, batches not aligned to the domains."""
    from dume.moe.edit import load_moe_streamed
    from dume.moe.merge import moerge_experts
    from dume.moe.routing import routing_shares, streamed_routing_shares

    dirs = _experts(kind, tmp_path)
    moe = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32))
    g = torch.Generator().manual_seed(3)
    blocks = {}
    for d, (n, width) in {"a": (5, 40), "b": (3, 64), "c": (4, 24)}.items():
        ids = torch.randint(0, TINY["vocab_size"], (n, width), generator=g)
        mask = torch.ones_like(ids)
        mask[0, width // 2:] = 0  # a shorter document, right-padded
        blocks[d] = (ids, mask)
    want = routing_shares(load_moe_streamed(moe), blocks, batch_size=2)
    got = streamed_routing_shares(moe, blocks, batch_size=3)
    assert got.keys() == want.keys()
    for d in want:
        torch.testing.assert_close(torch.tensor(got[d]), torch.tensor(want[d]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_streamed_perplexity_equals_the_loaded_models(kind, tmp_path):
    """`dume eval` runs every model one decoder layer at a time (`dume.moe.streamed`); its per-domain losses equal
    `dume.train.perplexity` on the loaded model -- the MoE, with its own or with replaced routers, and a dense
    expert -- on padded rows, batches not aligned to the domains."""
    from dume.moe.edit import load_moe_streamed
    from dume.moe.merge import moerge_experts
    from dume.moe.routing import stack_blocks
    from dume.train.models import load_model
    from dume.train.perplexity import perplexity
    from dume.upcycle.evaluate import _domain_nll

    dirs = _experts(kind, tmp_path)
    moe = moerge_experts(dirs, tmp_path / "moe", gates=_gates(2, 3, 32))
    other = moerge_experts(dirs, tmp_path / "other", gates=_gates(2, 3, 32, seed=9))
    g = torch.Generator().manual_seed(4)
    blocks = {}
    for d, n in {"a": 5, "b": 3}.items():
        ids = torch.randint(0, TINY["vocab_size"], (n, 48), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 30:] = 0
        blocks[d] = (ids, mask)
    ids, mask, owner = stack_blocks(blocks)
    replaced = [load_moe_streamed(other).model.layers[i].mlp.gate.weight.detach().clone() for i in range(2)]
    for path, model, gates in ((moe, load_moe_streamed(moe), None), (moe, load_moe_streamed(other), replaced),
                               (dirs[1], load_model(dirs[1]), None)):
        got = _domain_nll(path, ids, mask, owner, list(blocks), batch_size=3, device="cpu", dtype=None, gates=gates)
        for d, (i, m) in blocks.items():
            want = perplexity(model, i, m, batch_size=2)
            assert got[d]["tokens"] == want["tokens"]
            assert abs(got[d]["loss"] - want["loss"]) < 1e-5 * want["loss"], (path, d)
