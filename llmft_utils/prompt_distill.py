"""Distil any prompt prefix into a student: the practitioner's use of context distillation.

Given a base model, a prompt prefix (demonstrations or instructions, as text), a pattern (how a query is
written and which verbalizers answer it) and unlabelled queries, train a student that answers the
queries *without* the prefix as the base model does *with* it, save it, and report on held-out queries:
agreement and KL(teacher ‖ ·) for the student and for the untrained model (the control), and the cost
per query with and without the prefix.

    llmft-study distill --model smollm2-135m --prefix demos.txt --queries queries.jsonl --out students/mine
    python -m llmft_utils.prompt_distill ...                 # the same

Queries: JSONL, one object per line, either ``{"premise": ..., "hypothesis": ...}`` (written with the
pattern) or ``{"text": ...}`` (used as written; give ``--verbalizers``). The teacher's prompt is
``prefix + separator + query``, the student's ``query``. The study's CD (notebook 03) is this with the
prefix built from k balanced demonstrations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .data import text_problem

_START = time.perf_counter()
TRACKER_DIR = "trackers"  # in --out: the files of a tracker that writes files (tensorboard, aim)


def progress(msg: str) -> None:
    """One line on stderr with the seconds since the command started: ``[distill   12 s] training ...``."""
    print(f"[distill {time.perf_counter() - _START:4.0f} s] {msg}", file=sys.stderr, flush=True)


def read_queries(path) -> list[dict]:
    """The queries of a JSONL file; a clear error naming ``file:line`` for a line that is not one."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not ("text" in obj or {"premise", "hypothesis"} <= set(obj)):
            raise ValueError(f'{path}:{n}: expected {{"text": ...}} or {{"premise": ..., "hypothesis": ...}}')
        for field in ("text",) if "text" in obj else ("premise", "hypothesis"):
            problem = text_problem(obj[field])  # the study's rule: a null is refused, not distilled as "None"
            if problem:
                raise ValueError(f"{path}:{n}: {field!r} {problem}")
        out.append(obj)
    if len(out) < 4:
        raise ValueError(f"{path}: {len(out)} queries; need at least 4 (some are held out for the report)")
    return out


def query_texts(pattern, queries: list[dict], with_prefix: bool) -> list[str]:
    from .patterns import query_text

    sep = pattern.separator if with_prefix else ""
    return [sep + q["text"] if "text" in q else query_text(pattern, q["premise"], q["hypothesis"], with_prefix)
            for q in queries]


def _scores(lm, prefix: str, texts: list[str], verbalizers, max_tokens: int):
    from .probes import probe
    from .scoring import score_prompts

    with probe(lm.device) as pr:
        s = score_prompts(lm, prefix, texts, verbalizers, max_tokens=max_tokens)
    lp = s["logprobs"]
    return lp - np.logaddexp.reduce(lp, axis=1, keepdims=True), pr.wall_s / len(texts), s


def _versus(teacher: np.ndarray, other: np.ndarray) -> dict:
    """Agreement with the teacher's labels (95% Wilson interval over the held-out queries) and mean
    KL(teacher ‖ ·) (95% normal interval over them)."""
    from .scoring.evaluation import wilson_ci
    from .stats import agreement_stats, kl_per_example

    r = agreement_stats(teacher.argmax(1), other.argmax(1), teacher, other)
    kl = kl_per_example(teacher, other)
    half = 1.96 * float(kl.std(ddof=1)) / np.sqrt(len(kl)) if len(kl) > 1 else float("nan")
    agreed = int((teacher.argmax(1) == other.argmax(1)).sum())
    return {"agreement": r["agreement"], "agreement_ci95": list(wilson_ci(agreed, len(kl))),  # the study tables' interval
            "kl": r["kl"], "kl_ci95": [max(0.0, r["kl"] - half), r["kl"] + half]}  # a KL is never negative


# a paired test against the constant answer at this level; fewer discordant queries than MIN_DISCORDANT can
# never reach it (2 · 0.5^d >= 0.05 for d <= 5), whatever the student does
ALPHA, MIN_DISCORDANT = 0.05, 6


def versus_constant(teacher: np.ndarray, student: np.ndarray) -> dict:
    """The student against a constant answer (the teacher's majority label) as predictors of the teacher's
    labels on the same queries: exact McNemar p, and whether the held-out set can tell them apart at all
    (``resolvable``: at least MIN_DISCORDANT queries where the constant disagrees with the teacher)."""
    from .stats import mcnemar_exact

    t = teacher.argmax(1)
    const = np.full_like(t, np.bincount(t, minlength=2).argmax())
    test = mcnemar_exact(student.argmax(1) == t, const == t)
    return {"p": test["p"], "only_student": test["only_a"], "only_constant": test["only_b"],
            "resolvable": int((const != t).sum()) >= MIN_DISCORDANT, "alpha": ALPHA}


def small_set_warning(r: dict) -> str:
    """A warning when the held-out queries cannot tell the student from a constant answer; "" otherwise."""
    v, n = r["heldout"]["student_vs_constant"], r["n_heldout"]
    if not v["resolvable"]:
        return (f"{n} held-out queries are too few to tell any student from a constant answer (the teacher's "
                f"labels differ from its majority label on fewer than {MIN_DISCORDANT}): hold out more queries "
                "(--holdout) or give more")
    if v["p"] >= v["alpha"]:
        return (f"on {n} held-out queries the student is not distinguishable from a constant answer (McNemar "
                f"p = {v['p']:.2g}): its agreement may be the teacher's label bias alone; hold out more queries to tell")
    return ""


def check_out(out) -> Path:
    """``out`` resolved: a new folder, an empty one or the output of an earlier distill run (``report.json``),
    which a finished run replaces whole; a folder holding anything else is refused rather than replaced."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise ValueError(f"--out {out} holds other files and no report.json of an earlier distill run; a finished run "
                         "replaces its folder whole, so give a new or empty folder")
    return out


def split_queries(queries: list[dict], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(held out, training)``: a seeded share ``holdout`` of the queries (at least 2) and the rest."""
    order = np.random.default_rng(seed).permutation(len(queries))
    n_ho = max(2, int(round(holdout * len(queries))))
    return [queries[i] for i in order[:n_ho]], [queries[i] for i in order[n_ho:]]


def tracker_run_name(model: str, pattern: str, n_train: int) -> str:
    """The tracker's run name, ``prompt-cd_<model>_<pattern>_n<training queries>`` (a model folder by its
    name), in characters that every tracker takes as a folder or project name."""
    model = Path(model).name if Path(model).is_dir() else model
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"prompt-cd_{model}_{pattern}_n{n_train}")


def tracker_record(log_with, run_name: str) -> dict | None:
    """What the report says of the tracker: its name, the run's name and the folder (relative to ``--out``) of
    its files, where the tracker writes files to the folder accelerate gives it (tensorboard, aim); None for
    the others (wandb, mlflow, ...: where their own settings say) and for a tracker object. None without one."""
    if not log_with:
        return None
    if not isinstance(log_with, str):  # an accelerate GeneralTracker, set up by its caller
        return {"log_with": getattr(log_with, "name", type(log_with).__name__), "run_name": run_name,
                "logging_dir": None}
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    local = getattr(LOGGER_TYPE_TO_CLASS.get(log_with), "requires_logging_directory", False)
    return {"log_with": log_with, "run_name": run_name, "logging_dir": TRACKER_DIR if local else None}


def trained_student(lm, prefix: str, tr: list[dict], pattern, cfg, max_tokens: int, tracking=None):
    """``(student, stats, teacher_s)``: the teacher's targets for the training queries (``teacher_s`` seconds),
    and the student trained on them (wrapped, at the base model's dtype; ``tracking`` logs its curves)."""
    from .distill import answer_token_ids, target_extract, train_student
    from .models import wrap
    from .scoring import answer_logits

    vids = answer_token_ids(lm.tokenizer, pattern)
    t0 = time.perf_counter()
    teacher_logp, topk_ids = answer_logits(lm, prefix, query_texts(pattern, tr, True), target_extract(cfg, vids),
                                           batch_size=cfg.batch_size, max_tokens=max_tokens)
    teacher_s = time.perf_counter() - t0
    ids = lm.tokenizer(query_texts(pattern, tr, False), add_special_tokens=True)["input_ids"]
    rows = [{"input_ids": x, "label": 0, "teacher_logp": t.float()} for x, t in zip(ids, teacher_logp)]
    for row, top in zip(rows, topk_ids if topk_ids is not None else []):
        row["topk_ids"] = top
    progress(f"training the student: {cfg.epochs} epochs of {len(tr)} queries"
             + (", its curves to the tracker" if tracking else ""))
    student, stats = train_student(lm.model, lm.tokenizer, rows, cfg, vids, tracking=tracking)
    student = student.to(next(lm.model.parameters()).dtype)
    return wrap(student, lm.tokenizer, name="student", device=lm.device), stats, teacher_s


def heldout_comparison(lm, slm, prefix: str, ho: list[dict], pattern, max_tokens: int) -> tuple[dict, dict, int]:
    """``(heldout, cost, prefix_tokens)``: the student, the untrained model and a constant answer against the
    teacher on the held-out queries, and the cost per query of the teacher, the untrained model and the student."""
    from .stats import constant_agreement

    progress(f"scoring {len(ho)} held-out queries: teacher, untrained model, student")
    t_lp, t_spq, t_s = _scores(lm, prefix, query_texts(pattern, ho, True), pattern.verbalizers, max_tokens)
    z_lp, z_spq, _ = _scores(lm, "", query_texts(pattern, ho, False), pattern.verbalizers, max_tokens)
    s_lp, s_spq, s_s = _scores(slm, "", query_texts(pattern, ho, False), pattern.verbalizers, max_tokens)
    heldout = {"student_vs_teacher": _versus(t_lp, s_lp), "zeroshot_vs_teacher": _versus(t_lp, z_lp),
               "constant_vs_teacher": {"agreement": constant_agreement(t_lp.argmax(1))},
               "student_vs_constant": versus_constant(t_lp, s_lp),
               "teacher_label1_frac": float((t_lp.argmax(1) == 1).mean()),
               "student_label1_frac": float((s_lp.argmax(1) == 1).mean())}
    cost = {"teacher_s_per_query_prefix_reused": t_spq, "student_s_per_query": s_spq, "zeroshot_s_per_query": z_spq,
            "tokens_per_query_teacher": float(np.mean(t_s["query_tokens"])) + int(t_s["prefix_tokens"]),
            "tokens_per_query_student": float(np.mean(s_s["query_tokens"]))}
    return heldout, cost, int(t_s["prefix_tokens"])


def save_run(folder: Path, slm, lm, prefix: str, report: dict) -> None:
    """The student (``student/``, with its ``student.json``), ``report.json`` and ``report.md`` in ``folder``."""
    from .distill import save_student
    from .store import atomic_write_json

    h = report["heldout"]
    metrics = {"heldout": {"n": report["n_heldout"], "score_acc": float("nan"), "zeroshot_acc": float("nan"),
                           "agree_teacher_student": h["student_vs_teacher"]["agreement"],
                           "kl_teacher_student": h["student_vs_teacher"]["kl"]}}
    save_student(slm.model, lm.tokenizer, folder / "student", {
        "student_key": f"prompt-cd|{lm.name}|{report['pattern']['name']}|n{report['n_train']}", "method": "cd",
        "train_task": "prompt", "k": None, "seed": report["holdout_seed"], "n_train": report["n_train"],
        "base_model": lm.name, "base_model_source": lm.source, "base_model_reference": (lm.info or {}).get("reference"),
        "demo_pool": "the given prefix", "demo_ids": "the given prefix", "prefix": prefix, "pattern": report["pattern"],
        "dtype": lm.dtype, "device": lm.device, "recipe": report["recipe"], "metrics": metrics,
        "provenance": report["provenance"], "command": report["command"]})
    atomic_write_json(folder / "report.json", report)
    (folder / "report.md").write_text(report_markdown(report))


def distill_prompt(lm, prefix: str, queries: list[dict], out_dir, pattern, cfg=None, holdout: float = 0.2,
                   seed: int = 0, max_tokens: int = 0, log_with="") -> dict:
    """Train, save and report a student of ``lm`` prompted with ``prefix`` (see the module docstring).
    Returns the report (also written to ``out_dir/report.json`` and ``report.md``; the student is saved in
    ``out_dir/student/``). ``log_with``: an experiment tracker for the training curves (one of
    :data:`~llmft_utils.distill.config.TRACKERS`, or an accelerate ``GeneralTracker``), checked before any
    work; one that writes files writes them to ``out_dir/trackers/``, with the rest of the folder."""
    from .distill import DistillConfig, Tracking
    from .distill.export import run_command
    from .distill.training import check_tracker
    from .store import atomic_folder, folder_lock, provenance

    out_dir = check_out(out_dir)
    cfg = cfg or DistillConfig()  # the study's recipe (float32 training)
    if cfg.alpha > 0:
        raise ValueError("the queries are unlabelled: alpha must be 0")
    if not prefix.strip():
        raise ValueError("the prefix is empty: there is nothing to distil")
    check_tracker(log_with)
    # locked against a second run; everything, the tracker's files included, goes to a temporary folder that
    # replaces out_dir when the run is complete: the student, its curves and its report together, or nothing
    with folder_lock(out_dir, "distill run"), atomic_folder(out_dir) as tmp:
        ho, tr = split_queries(queries, holdout, seed)
        run_name = tracker_run_name(lm.name, pattern.name, len(tr))
        tracking = Tracking(log_with, run_name, tmp / TRACKER_DIR) if log_with else None
        progress(f"teacher targets ({cfg.target}) for {len(tr)} training queries, {len(ho)} held out")
        slm, stats, teacher_s = trained_student(lm, prefix, tr, pattern, cfg, max_tokens, tracking)
        heldout, cost, prefix_tokens = heldout_comparison(lm, slm, prefix, ho, pattern, max_tokens)
        one_off = teacher_s + stats["train_s"]
        saved = cost["teacher_s_per_query_prefix_reused"] - cost["student_s_per_query"]
        report = {
            "model": lm.name, "model_source": lm.source, "dtype": lm.dtype, "device": lm.device,
            "pattern": {"name": pattern.name, "template": pattern.template, "verbalizers": list(pattern.verbalizers),
                        "separator": pattern.separator},
            "prefix_tokens": prefix_tokens, "n_train": len(tr), "n_heldout": len(ho), "holdout_seed": seed,
            "recipe": dataclasses.asdict(cfg), "heldout": heldout,
            "cost": {**cost, "teacher_caching_s": teacher_s, "train_s": stats["train_s"],
                     "break_even_queries": (one_off / saved) if saved > 0 else None},
            "loss_first": stats["losses"][0], "loss_last": stats["losses"][-1],
            "tracker": tracker_record(log_with, run_name), "provenance": provenance(), "command": run_command(),
        }
        report["warnings"] = [w for w in [small_set_warning(report)] if w]
        save_run(tmp, slm, lm, prefix, report)
        return report


def _ci(v: list, digits: int = 3) -> str:
    return f"[{v[0]:.{digits}f}, {v[1]:.{digits}f}]"


def tracker_markdown(t: dict | None) -> str:
    """The report's line on the tracker of the training curves; "" without one."""
    if not t:
        return ""
    where = (f"its files in `{t['logging_dir']}/`" if t["logging_dir"]
             else "logged where the tracker's own settings send it (not in this folder)")
    return (f"\nTraining curves (loss, lr and gradient norm per optimizer step): {t['log_with']} run "
            f"`{t['run_name']}`, {where}.\n")


def report_markdown(r: dict) -> str:
    h, c = r["heldout"], r["cost"]
    be = f"{c['break_even_queries']:.0f}" if c["break_even_queries"] else "never (the student is not cheaper)"
    st, zs, vc = h["student_vs_teacher"], h["zeroshot_vs_teacher"], h["student_vs_constant"]
    warning = small_set_warning(r)
    return f"""# Distilled prompt: {r['model']} ({r['dtype']} on {r['device']})

Prefix of {r['prefix_tokens']} tokens; {r['n_train']} training queries, {r['n_heldout']} held out; target
{r['recipe']['target']}, {r['recipe']['epochs']} epochs at lr {r['recipe']['lr']:g}.
{chr(10) + '**Warning:** ' + warning + chr(10) if warning else ''}
| on held-out queries | agreement with the teacher [95% Wilson] | KL(teacher ‖ ·) [95% normal] |
|---|---|---|
| student (no prefix) | {st['agreement']:.3f} {_ci(st['agreement_ci95'])} | {st['kl']:.4f} {_ci(st['kl_ci95'], 4)} |
| untrained model (no prefix): the control | {zs['agreement']:.3f} {_ci(zs['agreement_ci95'])} | {zs['kl']:.4f} {_ci(zs['kl_ci95'], 4)} |
| a constant answer, the teacher's majority label | {h['constant_vs_teacher']['agreement']:.3f} | – |

Student against the constant answer on the same queries: it alone agrees with the teacher on
{vc['only_student']}, the constant alone on {vc['only_constant']} (exact McNemar p = {vc['p']:.2g}). The teacher
answers label 1 on {h['teacher_label1_frac']:.1%} of them, the student on {h['student_label1_frac']:.1%}: an
agreement no higher than the constant answer's shows that only the teacher's label bias transferred.

Cost per query: teacher {c['teacher_s_per_query_prefix_reused'] * 1000:.1f} ms ({c['tokens_per_query_teacher']:.0f} tokens,
prefix reused), student {c['student_s_per_query'] * 1000:.1f} ms ({c['tokens_per_query_student']:.0f} tokens). One-off:
teacher targets {c['teacher_caching_s']:.1f} s + training {c['train_s']:.1f} s; break-even after {be} queries.
{tracker_markdown(r.get('tracker'))}
Student: `student/` (load with `AutoModelForCausalLM.from_pretrained`). Made by `{r['command']}`.
"""


# the flags that are study parameters too: (flag, parameter, type); their defaults and help come from the
# "default" profile and the parameter spec, so `distill` trains with the study's recipe unless told otherwise
STUDY_FLAGS = (("--target", "target", str), ("--topk", "topk", int), ("--epochs", "epochs", int), ("--lr", "lr", float), ("--batch-size", "train_batch_size", int),
               ("--max-batch-tokens", "max_batch_tokens", int), ("--device", "device", str),
               ("--dtype", "dtype", str))


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, add_config_flag
    from .distill.config import TRACKERS
    from .params import spec
    from .patterns import PATTERNS
    from .profiles import PROFILES

    ap = argparse.ArgumentParser(prog="llmft-study distill", description=__doc__, formatter_class=HelpFormatter)
    add_config_flag(ap)
    ap.add_argument("--model", required=True, help="embedded name, alias, Hugging Face id or model directory")
    ap.add_argument("--prefix", required=True, help="text file: the demonstrations or instructions to distil (its final newline is dropped; "
                    "example: examples/distill/prefix.txt)")
    ap.add_argument("--queries", required=True, help="JSONL of unlabelled queries, one object per line: "
                    '{"premise": ..., "hypothesis": ...} or {"text": ...} (example: examples/distill/queries.jsonl)')
    ap.add_argument("--out", required=True, help="output folder (student/, report.json, report.md; trackers/ with "
                    "--log-with); written whole when the run ends, and locked while it runs")
    ap.add_argument("--pattern", default=PROFILES["default"]["pattern"], choices=sorted(PATTERNS),
                    help="how a query is written and which verbalizers answer it (llmft's patterns)")
    ap.add_argument("--verbalizers", nargs="+", default=None,
                    help='answers to score, e.g. " Yes" " No" (default: the pattern\'s)')
    ap.add_argument("--holdout", type=float, default=0.2,
                    help="share of the queries held out of training for the report (between 0 and 1)")
    params = spec()
    for flag, name, kind in STUDY_FLAGS:
        p = params[name]
        ap.add_argument(flag, type=kind, default=PROFILES["default"][name], choices=p.choices or None,
                        help=f"{p.help} (study parameter {name})")
    ap.add_argument("--log-with", default="", choices=TRACKERS, metavar="TRACKER",
                    help="experiment tracker for the training curves (loss, lr and gradient norm per optimizer step), "
                    f"through HF accelerate: {', '.join(t for t in TRACKERS if t)}; it must be installed (checked "
                    f"before the model loads). tensorboard and aim write to <out>/{TRACKER_DIR}/, written whole with the "
                    "rest of --out; the others log where their own settings say. Empty: none")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of training")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="a traceback with an error's message")
    return ap


def main(argv=None) -> int:
    from .cli import parse

    ap = build_parser()
    a, _ = parse(ap, argv)
    if not 0 < a.holdout < 1:
        ap.error("--holdout must be between 0 and 1")
    from .logs import run_verb

    return run_verb("distill", lambda: _run(a), a.verbose)


def checked_inputs(a):
    """``(prefix, queries, pattern, out)``: everything that can be told without the model's weights, checked
    (the tokenizer alone decides whether the longest prompt fits the model's context), the tracker too."""
    from .models import check_model_name, load_tokenizer
    from .patterns import get_pattern
    from .scoring import check_context
    from .distill.training import check_tracker
    from .store import ensure_writable

    check_tracker(a.log_with)  # an unknown or uninstalled tracker: one line, before any work
    for flag, path in (("--prefix", a.prefix), ("--queries", a.queries)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file (the prefix is plain text, the queries JSON lines; "
                                    "examples in docs/method.md)")
    prefix = Path(a.prefix).read_text().rstrip("\n")  # an editor's final newline is not part of the prompt
    problem = text_problem(prefix)
    if problem:
        raise ValueError(f"{a.prefix}: the prefix {problem}; there is nothing to distil")
    queries = read_queries(a.queries)
    pattern = get_pattern(a.pattern)
    if a.verbalizers:
        pattern = dataclasses.replace(pattern, name=f"{pattern.name}+custom", verbalizers=tuple(a.verbalizers))
    check_model_name(a.model)
    out = check_out(a.out)
    ensure_writable(out if out.exists() else out.parent)
    tok, context = load_tokenizer(a.model)
    check_context(tok, context, prefix, query_texts(pattern, queries, True), pattern.verbalizers)
    return prefix, queries, pattern, out


def _run(a) -> int:
    from .distill.config import DistillConfig
    from .models import load_model
    from .store import folder_lock

    progress(f"checking the inputs and {a.model}'s context (tokenizer only)")
    try:  # everything that can be told without the model's weights, before they load
        prefix, queries, pattern, out = checked_inputs(a)
    except (OSError, ValueError) as e:  # unreadable files, bad queries, an unusable --out
        print(f"distill: {e}", file=sys.stderr)
        return 2
    with folder_lock(out, "distill run"):  # held from before the model loads until the folder is complete
        progress(f"loading {a.model} ({a.dtype} on {a.device})")
        lm = load_model(a.model, device=a.device, dtype=a.dtype)
        cfg = DistillConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, mixed_precision="no",
                            target=a.target, topk=a.topk)
        r = distill_prompt(lm, prefix, queries, out, pattern, cfg, holdout=a.holdout, seed=a.seed,
                           max_tokens=a.max_batch_tokens, log_with=a.log_with)
    print(report_markdown(r))
    for w in r["warnings"]:
        print(f"distill: warning: {w}", file=sys.stderr)
    progress(f"done: the student and its report are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
