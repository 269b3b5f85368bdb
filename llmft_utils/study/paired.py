"""Paired comparisons of two prediction tables on the same examples: agreement, McNemar, the controls.
"""
from __future__ import annotations

from ..stats import STUDENT_CONTROLS, agreement_stats, control_tests, mcnemar_exact, verbalizer_logp


def agreement(teacher_preds, other_preds) -> dict:
    """Agreement, Cohen's κ and mean KL(teacher ‖ other) over the verbalizer distribution, on the
    examples both scored (prediction tables from :func:`llmft_utils.scoring.evaluation.evaluate`, aligned by ``idx``)."""
    t = teacher_preds.set_index("idx")
    o = other_preds.set_index("idx").loc[t.index]
    ok = ~(t["skipped"].to_numpy() | o["skipped"].to_numpy())

    return {**agreement_stats(t["pred"].to_numpy()[ok], o["pred"].to_numpy()[ok], verbalizer_logp(t[ok]),
                              verbalizer_logp(o[ok])), "n": int(ok.sum())}


def paired_vs(student_preds, other_preds, name: str) -> dict:
    """Exact McNemar test of the student against ``other`` (the zero-shot model or the teacher) on the examples
    both scored: ``student_only_right_vs_<name>``, ``<name>_only_right``, ``mcnemar_p_vs_<name>``."""
    s = student_preds.set_index("idx")
    o = other_preds.set_index("idx").loc[s.index]
    ok = ~(s["skipped"].to_numpy() | o["skipped"].to_numpy())
    r = mcnemar_exact((s["pred"] == s["label"]).to_numpy()[ok], (o["pred"] == o["label"]).to_numpy()[ok])
    return {f"student_only_right_vs_{name}": r["only_a"], f"{name}_only_right": r["only_b"],
            f"mcnemar_p_vs_{name}": r["p"]}


def controls_vs(student_preds, teacher_preds, zeroshot_preds, student_controls=None) -> dict:
    """:func:`stats.control_tests` on the examples that the student, its teacher, the zero-shot model (and
    every control student in ``student_controls``: name -> prediction table) all scored, matched by ``idx``:
    each control's agreement with the teacher, the McNemar p-values of the student against each,
    ``beats_controls`` and ``controls_checked``; for the control students also their mean
    KL(teacher ‖ control) over the verbalizers (``kl_teacher_<name>``; the student's is ``kl_teacher_student``)."""
    student_controls = {n: c for n, c in (student_controls or {}).items() if c is not None}
    s = student_preds.set_index("idx")
    t = teacher_preds.set_index("idx").reindex(s.index)
    z = zeroshot_preds.set_index("idx").reindex(s.index)
    cs = {n: c.set_index("idx").reindex(s.index) for n, c in student_controls.items()}
    ok = ~(s["skipped"].to_numpy(bool) | t["skipped"].fillna(True).to_numpy(bool) | z["skipped"].fillna(True).to_numpy(bool))
    for c in cs.values():
        ok &= ~c["skipped"].fillna(True).to_numpy(bool)
    out = control_tests(s["pred"].to_numpy()[ok], t["pred"].to_numpy()[ok].astype(int),
                        (z["logp_label1"] - z["logp_label0"]).to_numpy()[ok],
                        student_controls={n: c["pred"].to_numpy()[ok].astype(int) for n, c in cs.items()})
    for n in STUDENT_CONTROLS:
        out[f"kl_teacher_{n}"] = (agreement(t[ok].reset_index(), cs[n][ok].reset_index())["kl"] if n in cs
                                  else float("nan"))
    return out
