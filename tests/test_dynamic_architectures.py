"""`dume_experts.py` edits every MoE architecture `dume build` writes (Mixtral from Llama
and from Phi-3 experts, Qwen3-MoE from Qwen3 experts): removing, re-weighting and adding an expert give
the gates of a fresh `dume build` on the same experts and documents.

The experts differ in their MLPs only, and their shared weights have bfloat16's short
mantissa (so the float32 mean of any number of copies is exact): every expert set
averages to the same shared weights, and a fresh build's statistics are exactly those the
edit reuses or collects.
"""

from __future__ import annotations

import json

import pytest
import torch

import dume_experts
from helpers import tiny_tokenizer

NAMES = ("law", "med", "code")
WORDS = {"law": "court statute ruling appeal judge", "med": "patient dose aspirin fever clinic",
         "code": "def return import class print"}


def _model(kind: str):
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common))
    if kind == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM

        return Phi3ForCausalLM(Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))


@pytest.fixture(scope="module", params=["llama", "qwen3", "phi3"])
def setting(request, tmp_path_factory):
    torch.set_num_threads(1)
    kind = request.param
    root = tmp_path_factory.mktemp(f"edit_{kind}")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = _model(kind).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.bfloat16().float())
    for e, name in enumerate(NAMES):
        model = _model(kind).eval()
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(e + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".mlp." in pname:
                    p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / "experts" / name)
        tok.save_pretrained(root / "experts" / name)
        words = WORDS[name].split()
        (root / "data" / name).mkdir(parents=True)
        (root / "data" / name / "train.jsonl").write_text("".join(
            json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(6 + i % 5))}) + "\n"
            for i in range(24)))
    return kind, root


def _build(root, names, out):
    import yaml

    from dume.cli import main

    cfg = {"experts": [{"name": n, "model": f"experts/{n}", "data": f"data/{n}/train.jsonl"} for n in names],
           "gate": "dume", "dtype": "float32", "out": str(out), "seq_len": 32, "batch_size": 4, "held_out": 0}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["build", str(path)]) == 0
    return out


def _cli(*argv):
    from dume.cli import run_main

    return run_main(dume_experts.main, [str(a) for a in argv])


def _close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-6)


def test_remove_reweight_add_equal_a_fresh_build(setting, tmp_path):
    from transformers import AutoModelForCausalLM

    from dume.moe.edit import read_gates
    from dume.routers.closed_form import dume_gates
    from dume.stats.ridge import RidgeStats

    kind, root = setting
    three = _build(root, NAMES, root / "moe3")
    two = _build(root, NAMES[:2], root / "moe2")
    expected_class = {"llama": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "phi3": "MixtralForCausalLM"}[kind]
    assert type(AutoModelForCausalLM.from_pretrained(str(three))).__name__ == expected_class

    # remove: the two-expert MoE's gates
    assert _cli("remove", "--moe", three, "--domain", "code", "--out", tmp_path / "removed") == 0
    _close(read_gates(tmp_path / "removed"), read_gates(two))
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "removed"))).__name__ == expected_class

    # reweight: DUME on the fresh build's statistics, scaled
    assert _cli("reweight", "--moe", three, "--weights", "law=2,med=0.5", "--out", tmp_path / "rw") == 0
    scaled = RidgeStats.load(three / "dume_stats").scale_domain("law", 2).scale_domain("med", 0.5)
    _close(read_gates(tmp_path / "rw"), dume_gates(scaled, 0.01, 1.0))
    assert not torch.allclose(torch.stack(read_gates(tmp_path / "rw")), torch.stack(read_gates(three)))

    # add, both modes: the three-expert MoE's gates (the new domain's documents read from
    # a local data directory, cut the way the MoE's statistics were)
    for mode in ("keep-shared", "reaverage"):
        out = tmp_path / f"added_{mode}"
        assert _cli("add", "--moe", two, "--expert", root / "experts" / "code", "--domain", "code", "--mode", mode,
                    "--source", "local", "--data-dir", root / "data", "--out", out) == 0
        _close(read_gates(out), read_gates(three))
        got, ref = RidgeStats.load(out / "dume_stats"), RidgeStats.load(three / "dume_stats")
        assert got.domains == ref.domains
        # A fresh Phi-3 build collects through the fused oracle, keep-shared through the
        # MoE's split tensors: the same sums up to the float32 rounding of a fused matmul.
        tol = 1e-5 if kind == "phi3" and mode == "keep-shared" else 1e-9
        torch.testing.assert_close(got.A, ref.A, rtol=tol, atol=tol)
