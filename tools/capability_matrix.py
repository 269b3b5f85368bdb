"""Run one profile under several CPU kernel settings and measure how far the results move.

    python tools/capability_matrix.py                       # smoke under every SETTINGS entry, compared with the first
    python tools/capability_matrix.py --settings native avx2 --profile default --keep results/capability
    python tools/capability_matrix.py --record tests/golden/smoke   # (re)record the golden smoke run of `make test`

One machine can stand in for several CPUs: ATen's vector kernels follow ``ATEN_CPU_CAPABILITY``
(``default`` is the scalar build, the nearest stand-in for aarch64), oneDNN's follow ``ONEDNN_MAX_CPU_ISA``
(without AMX: ``AVX512_CORE_BF16``), MKL's ``MKL_ENABLE_INSTRUCTIONS``. Each setting runs the profile's
notebooks 01-03 in a fresh folder (notebook 04 is analysis of their tables: ``compare`` recomputes it), and
every run is compared with the first by :func:`llmft_utils.compare.compare` at the ``exact`` tolerance. The
report gives, per setting, the largest |delta log-prob| of inference and of trained rows, the predictions
and verdicts that changed; ``--json`` writes it (results/reproducibility/ keeps the measured one). The
tolerances in ``llmft_utils/compare.py`` are bounds on these spreads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> environment. "native" is whatever this CPU picks; "laptop" restricts every library to AVX2
SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "no_amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "laptop": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
GOLDEN_FILES = ("icl.csv", "cd.csv", "manifest.json", "run_manifest.json")


def run_profile(profile: str, folder: Path, env_extra: dict, sets: list, only=("01", "02", "03"), cwd: Path = ROOT) -> float:
    """The pipeline on ``profile`` into ``folder`` with this environment less any kernel restriction, plus
    ``env_extra`` (a SETTINGS entry, PYTHONPATH of another checkout); exits with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                            "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    env.update(env_extra)
    env.pop("LLMFT_RESULTS_DIR", None)
    cmd = [sys.executable, "-m", "llmft_utils.pipeline", "--profile", profile, "-q", "--set", f"results_dir={folder}"]
    for s in sets:
        cmd += ["--set", s]
    if only:
        cmd += ["--only", *only]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def scrub(text: str) -> str:
    """Machine-specific absolute paths out of a committed file."""
    return text.replace(str(ROOT), "<repo>").replace(str(ROOT.parent), "<repo>/..").replace(str(Path(tempfile.gettempdir())), "<tmp>")


def record(dest: Path, profile: str, sets: list) -> None:
    """Run the profile (all four notebooks) and keep its tables and prediction files as the golden run."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run_profile(profile, run, {}, sets, only=None)
        if dest.exists():
            shutil.rmtree(dest)
        (dest / "predictions").mkdir(parents=True)
        for name in GOLDEN_FILES:
            if (run / name).is_file():
                (dest / name).write_text(scrub((run / name).read_text()))
        for p in sorted((run / "predictions").glob("*.parquet")):
            shutil.copy(p, dest / "predictions" / p.name)
    print(f"recorded {dest} ({sum(1 for _ in (dest / 'predictions').iterdir())} prediction files)")


def main(argv=None) -> int:
    from llmft_utils import compare
    from llmft_utils.store import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the pipeline")
    ap.add_argument("--keep", metavar="DIR", help="keep the runs in DIR/<setting> (default: a scratch folder)")
    ap.add_argument("--json", metavar="FILE", help="write the spread report as JSON")
    ap.add_argument("--record", metavar="DIR", help="record the golden run into DIR instead")
    a = ap.parse_args(argv)
    if a.record:
        record(Path(a.record), a.profile, a.set)
        return 0
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="capmatrix-"))
    report = {"profile": a.profile, "sets": a.set, "settings": {}, "reference": a.settings[0]}
    for name in a.settings:
        folder = base / name
        if not (folder / "cd.csv").is_file():
            wall = run_profile(a.profile, folder, SETTINGS[name], a.set)
            print(f"{name}: ran in {wall:.0f} s", flush=True)
        c = compare.compare(base / a.settings[0], folder, "exact")
        counts = c.counts()
        env = c.environments["b"]
        report["settings"][name] = {"env": SETTINGS[name], "cpu_capability": env.get("cpu_capability"),
                                    **counts,
                                    "verdicts_changed_list": c.verdicts_changed.to_dict("records"),
                                    "max_dlogp_by_method": c.rows.groupby("method")["max_dlogp"].max().to_dict()
                                    if len(c.rows) else {}}
        print(f"{name:8s} vs {a.settings[0]}: inference max|dlogp| {counts['max_dlogp_inference']:.3g}, trained "
              f"{counts['max_dlogp_trained']:.3g}, noise-driven {counts['max_dlogp_noise_driven']:.3g}; predictions changed "
              f"{counts['predictions_changed_inference']} inference / {counts['predictions_changed_trained']} trained / "
              f"{counts['predictions_changed_noise_driven']} noise-driven of {counts['predictions_compared']}; verdicts "
              f"changed {counts['verdicts_changed']} of {counts['verdicts_compared']} "
              f"({counts['verdicts_changed_gated']} gated)", flush=True)
    if a.json:
        atomic_write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
