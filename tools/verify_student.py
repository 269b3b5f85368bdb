"""Check a saved student: the sha256 of its weight files, a load with transformers alone and, in a results
folder, its accuracy recomputed with plain code (see llmft_utils/verify.py; the same as
``llmft-study verify-student``).

    python tools/verify_student.py results/default                 # the first student under students/
    python tools/verify_student.py results/default --student students/cd-mnli-k4-s0-... --task mnli
    python tools/verify_student.py students/mine                   # a `llmft-study distill --out` folder
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmft_utils.verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
