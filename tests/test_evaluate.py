import math

import torch
import torch.nn.functional as F

from dume.train.perplexity import perplexity
from tests.helpers import tiny_llama


def test_perplexity_equals_hand_computation_and_ignores_padding():
    model = tiny_llama(vocab_size=50).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0          # right padding
    mask[2, 3:] = 0
    ids_padded = ids.clone()
    ids_padded[mask == 0] = 0

    # By hand: one sequence at a time, only its real tokens, no batching, no mask.
    total, count = 0.0, 0
    for row in range(3):
        n = int(mask[row].sum())
        seq = ids_padded[row:row + 1, :n]
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0]
        logp = F.log_softmax(logits.double(), -1)
        for t in range(n - 1):
            total -= float(logp[t, seq[0, t + 1]])
            count += 1

    result = perplexity(model, ids_padded, mask, batch_size=2)
    assert result["tokens"] == count == 11 + 6 + 2
    assert math.isclose(result["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-5)

    # Changing what sits in the padded positions changes nothing.
    garbage = ids_padded.clone()
    garbage[mask == 0] = 7
    assert math.isclose(perplexity(model, garbage, mask)["loss"], result["loss"], rel_tol=1e-6)


def test_auto_device_is_this_process_gpu_when_there_is_one(monkeypatch):
    """`--device auto` (evaluation, statistics, `dume build`): this process's GPU under `accelerate launch`
    (its LOCAL_RANK), else the CPU (issue 22, item 1; the GPU itself is exercised by bench/gpu_acceptance.py)."""
    import torch

    from dume.clm.run import Run
    from dume.runtime.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == "cuda:2" and resolve_device("cpu") == "cpu"
    args = type("Args", (), {"run_dir": "runs/x", "source": "offline", "data_dir": None, "seq_len": 8,
                             "tokenizer": None, "vocab_size": 64, "device": "auto"})
    assert Run.from_args(args).device == "cuda:2"
