import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

# Never touch the network from tests: the Hub paths must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("LLMFT_DATA_DIR", SHARED / "data"))
    if not (d / "rte").is_dir():
        pytest.skip(f"data mirror not found at {d}; set LLMFT_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def tiny_lms():
    """Tiny random OPT (tokenizer adds a BOS) and Llama (no BOS) models."""
    from llmft_utils import models

    out = {}
    for arch, bos in (("opt", True), ("llama", False)):
        tok = models.tiny_tokenizer(add_bos=bos)
        out[arch] = models.wrap(models.tiny_model(arch, tok, max_positions=4096), tok, name=f"tiny-{arch}")
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from llmft_utils import models

    return models.embedded_tokenizer("smollm2-135m")
