"""The study's profiles: named sets of notebook parameters (``--profile smoke|default|full|gpu``).

Every value is a notebook parameter (:func:`llmft_utils.params.spec` declares and checks each). A profile is
the one place a run's defaults live; ``--set NAME=VALUE`` and sweep files override them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .distill.config import DistillConfig
from .study.plan import EvalOptions, recipe_params

# Profiles: every value is a notebook parameter. "smoke" equals the notebooks' own parameter cells
# (checked by tests/test_pipeline.py), so nbval and `--profile smoke` run the same thing.
# The CD recipe is DistillConfig's defaults and the scoring options EvalOptions' (their one place). Students train
# in float32 (mixed_precision="no") on CPU: bf16 autocast changed 5.7% of the student predictions against float32
# (worst row 15%), over the bar declared before the measurement (compare.PRECISION_BAR: 2% pooled, 5% per row;
# results/reproducibility/default_bf16_vs_float32.txt), so it is opt-in there. The gpu profile keeps it.
_COMMON = {"model": "smollm2-135m", "pattern": "gpt-3", "data_dir": "", "results_dir": "", "device": "auto", "dtype": "auto",
           "eval_seed": 0, "dev_n": 200, "on_too_long": EvalOptions.on_too_long, "force": False, "cd_tasks": ["mnli", "rte"],
           "ood_train_tasks": ["mnli", "rte"], "controls": ["shuffled", "self"], "control_tasks": ["mnli", "rte"],
           **recipe_params(DistillConfig()), "pbft_lr": 1e-4, "batch_size": EvalOptions.batch_size,
           "max_batch_tokens": EvalOptions.max_tokens, "save_students": "none", "log_with": "", "ensemble_combine": "prob",
           "ensemble_m": 4, "ensemble_ks": [16], "ensemble_seeds": [0], "ensemble_tasks": ["mnli", "rte"],
           "ensemble_ood": True,
           "extra_eval_sets": [],
           "qqp_eval_n": 1000, "compare_with": ""}
# llmft's full grid: MNLI -> HANS, MNLI-mismatched and ANLI, QQP -> PAWS-QQP, RTE -> HANS (the three patterns:
# --sweep sweeps/patterns.json --profile full)
_GRID = {"extra_eval_sets": ["mnli_mismatched/validation", "qqp/heldout", "paws_qqp/dev_and_test", "anli/dev_r1",
                             "anli/dev_r2", "anli/dev_r3"],
         "cd_tasks": ["mnli", "rte", "qqp"], "ood_train_tasks": ["mnli", "rte", "qqp"]}
PROFILES: dict[str, dict] = {
    "smoke": {**_COMMON, "profile": "smoke", "mnli_eval_n": 40, "rte_eval_n": 20, "hans_eval_n": 30, "dev_n": 16,
              "ks": [0, 4], "seeds": [0], "control_tasks": ["mnli"],
              "ensemble_m": 2, "ensemble_ks": [4], "ensemble_seeds": [0], "ensemble_tasks": ["mnli"],
              "cd_ks": [4], "n_transfer": 16, "pbft_n": 4, "epochs": 1, "pbft_epochs": 1, "lr": 1e-4},
    # the main study, sized for <= 45 min on 2 CPU cores (README "Profiles"): k = 4, the RTE students on
    # HANS, the RTE control students, teacher ensembles beyond seed 0 and on HANS are in "full"
    "default": {**_COMMON, "profile": "default", "save_students": "first", "mnli_eval_n": 400, "rte_eval_n": 0,
                "hans_eval_n": 480, "ks": [0, 16], "seeds": [0, 1, 2], "ood_train_tasks": ["mnli"],
                "control_tasks": ["mnli"], "cd_ks": [16], "n_transfer": 64, "pbft_n": 16, "pbft_epochs": 4,
                "ensemble_ood": False},
    "full": {**_COMMON, **_GRID, "profile": "full", "save_students": "first", "mnli_eval_n": 0, "rte_eval_n": 0,
             "hans_eval_n": 0, "ks": [0, 1, 2, 4, 16, 32, 64], "seeds": list(range(10)),
             "cd_ks": [4, 16], "n_transfer": 512, "pbft_n": 16, "epochs": 2, "pbft_epochs": 8,
             "ensemble_seeds": list(range(10))},
    # one GPU: every evaluation set in full (MNLI-binary 6,692, RTE 277, HANS 30,000), k up to 32, ten seeds,
    # CD at k = 4, 16, 32 and PBFT, each student scored in domain and on HANS; the default profile's recipe
    "gpu": {**_COMMON, "profile": "gpu", "mnli_eval_n": 0, "rte_eval_n": 0, "hans_eval_n": 0,
            "ks": [0, 4, 16, 32], "seeds": list(range(10)), "max_batch_tokens": 32768,
            "cd_ks": [4, 16, 32], "n_transfer": 64, "pbft_n": 16, "pbft_epochs": 4,
            "ensemble_m": 0,  # the timed GPU grid of issue 12; ensembles and the llmft grid are in "full"
            # bf16 autocast, as docs/gpu.md measured it (its students differ from float32 ones: see _COMMON)
            "mixed_precision": "bf16"},
    # the main comparison on a model whose ICL is above the majority class (Qwen2.5-Coder-0.5B-Instruct, opt-in:
    # `make qwen`), sized for <= 60 min on 2 CPU cores with a 15% margin (measured: 48 min of notebooks; a
    # 630M-parameter model: ~0.3 s per MNLI query, ~10.5 s per training step of 8): five seeds, CD students on
    # MNLI only (their HANS scores are the out-of-domain test), the shuffled control, no PBFT and no ensembles;
    # RTE is scored by ICL only, on 20 rows (01 always prepares it), and nothing is claimed from it
    "qwen": {**_COMMON, "profile": "qwen", "model": "qwen2.5-coder-0.5b", "save_students": "first",
             "mnli_eval_n": 160, "rte_eval_n": 20, "hans_eval_n": 120, "ks": [0, 8], "seeds": [0, 1, 2, 3, 4],
             "cd_tasks": ["mnli"], "ood_train_tasks": ["mnli"], "controls": ["shuffled"], "control_tasks": ["mnli"],
             "cd_ks": [8], "n_transfer": 16, "pbft_n": 0, "pbft_epochs": 4, "ensemble_m": 0},
}

PROFILE_NOTES = {"smoke": "tiny evaluation sets (= the notebooks' own cells)",
                 "default": "the main study on the embedded model",
                 "full": "every evaluation set in full, larger transfer sets, llmft's grid",
                 "gpu": "one GPU: full sets, k up to 32, ten seeds",
                 "qwen": "the main comparison on Qwen2.5-Coder-0.5B (make qwen first): five seeds, MNLI students"}


@dataclass(frozen=True)
class Timing:
    """How long a profile's notebooks took, where and when: the one source of every time estimate (README,
    ``llmft-study profiles``, the error messages). ``notebooks_s`` is the run manifest's ``wall_s``;
    ``setup_s`` the first ``make venv`` on a clean clone; ``source`` the file it is read from, or how an
    estimate was made when it was not measured (``measured=False``)."""
    notebooks_s: float | None
    host: str
    date: str
    source: str
    measured: bool = True
    setup_s: float = 0.0
    what: str = "of notebooks"

    def minutes(self) -> str:
        """``"36 min"`` (notebooks and set-up), ``"not measured"`` when there is no number."""
        if self.notebooks_s is None:
            return "not measured"
        total = (self.notebooks_s + self.setup_s) / 60
        return f"{'about ' if not self.measured else ''}{total:.0f} min" if total >= 3 else f"{total * 60:.0f} s"

    def describe(self) -> str:
        """One line: the time, how it was obtained, the host and the date."""
        if self.notebooks_s is None:
            return f"not measured ({self.source})"
        how = "measured" if self.measured else "estimated"
        setup = f" + {self.setup_s:.0f} s set-up" if self.setup_s else ""
        return f"{self.minutes()} ({how}: {self.notebooks_s:.0f} s {self.what}{setup}, {self.host}, {self.date}; {self.source})"


VENV_SETUP_S = 90.0  # `make venv` on a clean clone with the package cache warm (CI log, 2026-12-03)
TIMINGS: dict[str, Timing] = {
    "smoke": Timing(167.0, "cpu:Intel(R) Xeon(R) Processor x2 threads", "2026-12-03",
                    "tests/golden/smoke/run_manifest.json"),
    # float32 training (since 2026-12-07): estimated from the rows of a measured one-seed run of this grid on an
    # AVX2-only EPYC (tests/test_cli.py recomputes it); the bf16-autocast default measured 2,167 s on a host with
    # native bf16 (results/reference/run_manifest.json, 2026-11-28)
    "default": Timing(4122.0, "cpu:AMD EPYC (AVX2) x2 threads", "2026-12-07",
                      "results/reference-f32-seed0: one seed measured (2,021 s), its rows scaled to three seeds and "
                      "the RTE ensemble", measured=False, setup_s=VENV_SETUP_S),
    "full": Timing(None, "", "", "many hours on 2 CPU cores; never run end to end"),
    "gpu": Timing(35 * 60.0, "one NVIDIA H200", "2026-11", "docs/gpu.md: one seed took 206 s, times ten seeds "
                  "and the larger k", measured=False),
    "qwen": Timing(2896.6, "cpu:AMD EPYC x2 threads", "2026-12-07", "results/reference-qwen/run_manifest.json",
                   setup_s=VENV_SETUP_S),
}
TEST_SUITE = Timing(712.0, "cpu:AMD EPYC (AVX2, no AVX512) x2 threads", "2026-12-06", ".ci/run on a clean clone (CI log)",
                    what="of `make test`, set-up included")


def profile_line(name: str) -> str:
    """``name  note; time``: what ``llmft-study profiles`` prints first for each profile."""
    return f"{name:8s} {PROFILE_NOTES[name]}; {TIMINGS[name].describe()}"


def profile_summary(name: str) -> str:
    """Two lines per profile for ``llmft-study profiles``: what it is and how long it took, then its grid."""
    prof = PROFILES[name]
    sizes = " ".join(f"{t}={prof[t + '_eval_n'] or 'all'}" for t in ("mnli", "rte", "hans"))
    return (f"{profile_line(name)}\n         ks={prof['ks']} seeds={prof['seeds']} cd_ks={prof['cd_ks']} "
            f"sizes: {sizes}")


def time_hint() -> str:
    """``smoke 167 s, default about 70 min``: the profiles' times ("about" where estimated), for error messages
    that ask for a profile."""
    return ", ".join(f"{n} {t.minutes()}" for n, t in TIMINGS.items() if t.notebooks_s)
