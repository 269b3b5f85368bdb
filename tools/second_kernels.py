"""Exit 0 when `make test` needs its AVX2 pass (test-notebooks-avx2) to compare a second CPU kernel set with the
golden run, 1 when this host's own kernels are that second set already (they are AVX2, and the golden run was
recorded under another set): then test-notebooks alone compares two kernel sets, and the AVX2 pass would repeat
it exactly. Prints which case this is."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "smoke" / "run_manifest.json"


def main() -> int:
    native = torch.backends.cpu.get_cpu_capability()
    golden = json.loads(GOLDEN.read_text())["provenance"]["cpu_capability"]
    if native == "AVX2" and golden != "AVX2":
        print(f"test: this CPU's own kernels are AVX2 and the golden run's are {golden}: test-notebooks compares two "
              "kernel sets; the AVX2 pass (test-notebooks-avx2) would repeat it and is left out", flush=True)
        return 1
    print(f"test: this CPU's kernels are {native}, the golden run's {golden}: test-notebooks-avx2 adds AVX2", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
