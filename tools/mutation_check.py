"""Show that the golden check of `make test` fails on real regressions, under every CPU kernel setting.

    python tools/mutation_check.py                          # 3 mutations x native, avx2, default
    python tools/mutation_check.py --settings avx2 --mutations lr_x10

For each setting (tools/capability_matrix.py's SETTINGS): notebooks 01-02 of the smoke profile run once on
the unmutated code; then, for each mutation, a copy of the checkout with that one change runs notebook 03 on
a copy of those results, and the run is compared with tests/golden/smoke at the tolerance the test uses
(``cpu``), exactly as tests/golden_check.py does. Notebooks 01, 02 and 04 do not depend on these mutations
(04 is recomputed by the comparison itself). A mutation is *caught* when the comparison fails. Also the
unmutated code is compared, and must pass. Prints one line per (setting, mutation) and writes JSON.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# name -> (file, old text, new text): one change each
MUTATIONS = {
    "lr_x10": ("llmft_utils/distill/training.py", "torch.optim.AdamW(params, lr=cfg.lr,", "torch.optim.AdamW(params, lr=cfg.lr * 10,"),
    "kl_swapped": ("llmft_utils/distill/losses.py", "        return forward_kl(student_logp, teacher_logp)\n",
                   "        return reverse_kl(student_logp, teacher_logp)\n"),
    "targets_permuted": ("llmft_utils/study/cd_sweep.py", '            if method == "cd_shuffled":  # the same targets',
                         '            if method in ("cd", "cd_shuffled", "cd_ensemble"):  # the same targets'),
}


def mutated_checkout(name: str, dest: Path) -> Path:
    """A copy of the checkout's code (llmft_utils, notebooks, tests, tools) with mutation ``name`` applied."""
    for part in ("llmft_utils", "notebooks", "tests", "tools", "sweeps"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    if name != "none":
        file, old, new = MUTATIONS[name]
        path = dest / file
        text = path.read_text()
        if text.count(old) < 1:
            sys.exit(f"mutation {name}: {old!r} not found in {file}")
        path.write_text(text.replace(old, new))
    return dest


def main(argv=None) -> int:
    from capability_matrix import SETTINGS, run_profile

    from llmft_utils import compare
    from llmft_utils.store import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", default=["native", "avx2", "default"], choices=list(SETTINGS))
    ap.add_argument("--mutations", nargs="*", default=["none", *MUTATIONS], choices=["none", *MUTATIONS])
    ap.add_argument("--golden", default=str(ROOT / "tests" / "golden" / "smoke"))
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    report, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tmp = Path(tmp)
        for setting in a.settings:
            base = tmp / setting / "base"
            run_profile("smoke", base, SETTINGS[setting], [], only=("01", "02"))
            for mutation in a.mutations:
                code = mutated_checkout(mutation, tmp / setting / f"code_{mutation}")
                folder = tmp / setting / mutation
                shutil.copytree(base, folder)
                run_profile("smoke", folder, {**SETTINGS[setting], "PYTHONPATH": str(code)}, [], only=("03",), cwd=code)
                c = compare.compare(a.golden, folder, compare.DEFAULT_TOLERANCE)
                counts = c.counts()
                caught = not c.ok
                expected = mutation != "none"
                failures += caught != expected
                report.append({"setting": setting, "mutation": mutation, "check_fails": caught,
                               "as_expected": caught == expected, "rows_over_tolerance": counts["rows_over_tolerance"],
                               "max_dlogp_trained": counts["max_dlogp_trained"],
                               "predictions_changed_trained": counts["predictions_changed_trained"],
                               "verdicts_changed_gated": counts["verdicts_changed_gated"]})
                print(f"{setting:8s} {mutation:17s} golden check {'FAILS' if caught else 'passes'} "
                      f"({'as expected' if caught == expected else 'NOT AS EXPECTED'}): "
                      f"{counts['rows_over_tolerance']} rows over tolerance, max |dlogp| trained "
                      f"{counts['max_dlogp_trained']:.3g}, {counts['predictions_changed_trained']} trained predictions "
                      f"and {counts['verdicts_changed_gated']} gated verdicts changed", flush=True)
    if a.json:
        atomic_write_json(a.json, report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
