"""Test-wide settings: never touch the network, keep torch to the two cores we have."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests are CPU tests: their equivalences are exact (1e-9) on the CPU, and the scripts
# pick a GPU by themselves when one is visible, where kernels reorder sums. On a GPU
# machine they run on the CPU unless DUME_TEST_CUDA=1 (then expect tolerance failures).
if os.environ.get("DUME_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
