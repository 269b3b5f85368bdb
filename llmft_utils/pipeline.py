"""Run the study notebooks in order with papermill (installed as the command ``llmft-study``).

    llmft-study run --profile smoke                              # = llmft-study --profile smoke
    llmft-study profiles                                         # each profile's grid and its measured time
    llmft-study run --config my_run.yaml                         # flags and notebook parameters from a file
    llmft-study distill --model M --prefix demos.txt --queries q.jsonl --out DIR   # distil any prompt
    llmft-study compare RUN_A RUN_B                             # two results folders: rows, examples, verdicts
    llmft-study verify-student FOLDER                           # a saved student: checksums, plain load, accuracy
    python -m llmft_utils.pipeline --profile default            # the main study on the embedded model
    python -m llmft_utils.pipeline --profile smoke --only 01    # one notebook
    python -m llmft_utils.pipeline --profile default --set model=facebook/opt-125m --set ks=[0,4]
    python -m llmft_utils.pipeline --sweep sweeps/patterns.json       # several runs from a parameter file

Executed copies are kept in ``<results>/executed/``. A failing notebook stops the run with a non-zero
exit status and a message naming the notebook and the cell. Finished rows are skipped on rerun
(``--force`` recomputes them); tables are written atomically, so a killed run leaves no partial rows
and the same command completes it.

A sweep file is JSON: ``{"profile": "default", "runs": [{"pattern": "minimal"}, {"model": "opt-125m"}]}``;
each run is the profile with that run's parameters overridden (``--set`` applies to every run).
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from . import logs
from .profiles import PROFILES
from .progress import RUN_PREFIX, duration
from .store import (PIPELINE_PID_ENV, atomic_write, atomic_write_json, portable, provenance, repo_relative, repo_root,
                    results_dir)

NOTEBOOKS = ["01_data_prep.ipynb", "02_icl_baselines.ipynb", "03_context_distillation.ipynb", "04_analysis.ipynb"]

class NotebookFailed(RuntimeError):
    """A notebook stopped; ``user_error``: by one of the errors that mean a mistake in the inputs (exit status 2)."""
    def __init__(self, msg: str, user_error: bool = False):
        super().__init__(msg)
        self.user_error = user_error


# errors that report a mistake in parameters, data, results files or the model's inputs, not a bug: the pipeline
# prints their one-line message and exits with status 2 (the traceback stays in the executed copy)
USER_ERRORS = logs.USER_ERRORS


def notebook_parameters(nb_path: Path) -> set:
    """Names assigned in the notebook's ``parameters`` cell."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse(cell.source)
            return {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
    raise NotebookFailed(f"{nb_path} has no cell tagged 'parameters'")


def _source_cell(nb_path: Path, executed_path: Path, executed_index: int) -> str:
    """Describe the failing cell by its index in the *source* notebook (papermill adds a cell) and first line."""
    import nbformat

    try:
        executed = nbformat.read(executed_path, as_version=4).cells
        src = next(c.source for c in executed if c.cell_type == "code"
                   and any(o.get("output_type") == "error" for o in c.get("outputs", [])))
        cells = nbformat.read(nb_path, as_version=4).cells
        idx = next(i for i, c in enumerate(cells) if c.source == src)
    except (OSError, IndexError, StopIteration):
        return f"cell {executed_index} of the executed copy"
    first = next((ln for ln in src.splitlines() if ln.strip() and not ln.startswith("#")), "")
    return f"cell {idx} ({first[:60]!r})"


_BAR = re.compile(r"\d+%\||\d+/\d+ \[\d|it/s\]")  # a tqdm bar written to stderr (model loading, saving)


class QuietTerminal(logging.Filter):
    """What the terminal shows of the notebooks' streamed output by default: from stdout (INFO) only the sweeps'
    ``[run i/n]`` lines and the library's ``warning:`` lines; from stderr (WARNING) everything but progress bars.
    papermill's own lines (cell markers, paths) are left to the log file."""

    def __init__(self, keep_info: bool = True):
        super().__init__()
        self.keep_info = keep_info

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("papermill"):
            return True
        lines = str(record.getMessage()).splitlines()
        if record.levelno >= logging.WARNING:
            kept = [line for line in lines if line.strip() and not _BAR.search(line)]
        elif self.keep_info:
            kept = [line.strip() for line in lines if line.strip().startswith((RUN_PREFIX, "warning:"))]
        else:
            kept = []
        if not kept:
            return False
        record.msg, record.args = "\n  | ".join(kept), ()
        return True


def setup_terminal(verbose: int, quiet: bool) -> None:
    """The terminal handler: everything with ``-v``; warnings only with ``-q``; else :class:`QuietTerminal`."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in [h for h in root.handlers if getattr(h, "llmft_terminal", False)]:
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stdout)
    console.llmft_terminal = True
    console.setFormatter(logging.Formatter("  | %(message)s"))
    console.setLevel(logging.WARNING if quiet else logging.DEBUG)
    if not verbose:
        console.addFilter(QuietTerminal(keep_info=not quiet))
    root.addHandler(console)


class RunLog:
    """The whole log of one run (every line papermill streams, at DEBUG) in ``<results>/logs/``; the
    pipeline's own lines go there too through :meth:`say`."""

    def __init__(self, out_dir: Path, label: str = ""):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = out_dir / "logs" / f"{label + '-' if label else ''}run-{stamp}-{os.getpid()}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.handler)

    def say(self, msg: str, err: bool = False) -> None:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)
        self.handler.emit(logging.LogRecord("llmft-study", logging.ERROR if err else logging.INFO, "", 0, msg,
                                            None, None))

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def run_notebook(nb_path: Path, out_path: Path, params: dict) -> float:
    import papermill as pm

    names = notebook_parameters(nb_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb_path), str(out_path), parameters={k: v for k, v in params.items() if k in names},
                            cwd=str(nb_path.parent), kernel_name="python3", progress_bar=False, log_output=True,
                            # the kernel's own start-up warnings (ZMQ transport) only at -v (debug verbosity)
                            extra_arguments=[] if os.environ.get(logs.ENV) == "debug" else
                            ["--IPKernelApp.log_level=ERROR"])
    except pm.PapermillExecutionError as e:
        where = _source_cell(nb_path, out_path, e.cell_index)
        raise NotebookFailed(f"{nb_path.name} failed in {where}: {e.ename}: {e.evalue}\n"
                             f"  executed copy with the traceback: {out_path}", e.ename in USER_ERRORS) from None
    finally:
        portable_metadata(out_path)
    return time.perf_counter() - t0


def portable_metadata(path: Path) -> None:
    """The executed copy's papermill record with the notebook's paths as :func:`store.portable` writes them
    (papermill stores the absolute input and output paths it was given)."""
    import nbformat

    if not path.is_file():
        return
    nb = nbformat.read(path, as_version=4)
    pm_meta = nb.metadata.get("papermill", {})
    paths = {k: pm_meta[k] for k in ("input_path", "output_path") if pm_meta.get(k)}
    if all(portable(v) == v for v in paths.values()):
        return
    pm_meta.update({k: portable(v) for k, v in paths.items()})
    atomic_write(path, lambda tmp: nbformat.write(nb, str(tmp)))


def resolve_params(profile: str, overrides: dict, force: bool = False) -> dict:
    """The profile's parameters with ``overrides`` applied (unknown names are left for :func:`check_run`)."""
    params = {**PROFILES[profile], **overrides}
    if force:
        params["force"] = True
    return params


def select_notebooks(only=None) -> list:
    nbs = [n for n in NOTEBOOKS if only is None or any(n.startswith(p) for p in only)]
    if not nbs:
        raise SystemExit(f"--only {only} matches none of {NOTEBOOKS}")
    return nbs


def check_run(params: dict, nbs: list) -> None:
    """Every problem with one run's parameters, raised together before anything runs (no model load, no
    write): names, types, allowed values, the model name (for 02/03), the results folder's writability."""
    from .params import validate

    validate(params, notebooks=nbs, check_model=any(n[:2] in ("02", "03") for n in nbs))


def run_profile(profile: str, overrides: dict, only=None, force: bool = False, label: str = "") -> int:
    """Run the notebooks of one parameter set; returns the exit status (0 = all notebooks succeeded)."""
    from .study import schema

    params = resolve_params(profile, overrides, force)
    nbs = select_notebooks(only)
    check_run(params, nbs)
    if any(n[:2] in ("02", "03") for n in nbs):
        from .params import precision_warnings

        for w in precision_warnings(params):
            print(f"warning: {w}", file=sys.stderr, flush=True)
    out_dir = results_dir(params["results_dir"], params["profile"])
    params["results_dir"] = repo_relative(out_dir)  # results/<profile> inside the checkout: the same on every machine
    os.environ[PIPELINE_PID_ENV] = str(os.getpid())  # kernels refuse to write once this process is gone
    os.environ.setdefault("LLMFT_PROGRESS", "lines")  # papermill streams text: periodic lines, not frozen widget bars
    prov = provenance()
    manifest = {"profile": profile, "label": label, "parameters": params, "provenance": prov, "notebooks": {},
                "schema_version": schema.RUN_MANIFEST_VERSION, "schemas": schema.versions()}
    mpath = out_dir / (f"run_manifest_{label}.json" if label else "run_manifest.json")
    if only is not None and mpath.is_file():  # a partial rerun keeps the other notebooks' records
        old = json.loads(mpath.read_text())
        manifest["notebooks"] = {n: {"git_commit": old.get("provenance", {}).get("git_commit"), **v}
                                 for n, v in old.get("notebooks", {}).items() if n not in nbs}
    run_log = RunLog(out_dir, label)
    try:
        return _run_notebooks(nbs, params, profile, label, out_dir, manifest, mpath, run_log)
    finally:
        run_log.close()


def reference_walls(profile: str, params: dict) -> dict:
    """``{notebook: wall_s}`` of the profile's measured run (profiles.TIMINGS), when this run has its
    parameters except where results go; {} otherwise (no ETA is better than a wrong one)."""
    from .profiles import TIMINGS

    t = TIMINGS.get(profile)
    path = repo_root() / t.source if t is not None and t.measured and t.notebooks_s else None
    if path is None or not path.is_file():
        return {}
    ref = json.loads(path.read_text())
    skip = {"results_dir", "data_dir", "force"}
    same = {k: v for k, v in ref.get("parameters", {}).items() if k not in skip} == \
        {k: v for k, v in params.items() if k not in skip}
    return {n: v["wall_s"] for n, v in ref.get("notebooks", {}).items() if "wall_s" in v} if same else {}


def eta_line(done: dict, todo: list, ref: dict) -> str:
    """``~3 min left (the measured run's pace)``: the reference notebook times of what is left, scaled by
    how this run compares with the reference on the notebooks done so far; "" without a reference."""
    if not todo or not ref or not all(n in ref for n in [*done, *todo]) or not done:
        return ""
    pace = sum(done.values()) / max(sum(ref[n] for n in done), 1e-9)
    left = pace * sum(ref[n] for n in todo)
    return f"; ~{duration(left)} left at this run's pace ({pace:.2f}x the measured one)"


def _run_notebooks(nbs, params, profile, label, out_dir, manifest, mpath, run_log) -> int:
    say = run_log.say
    ref = reference_walls(profile, params)
    walls = {}
    say(f"[pipeline] profile {profile}{', ' + label if label else ''}: {len(nbs)} notebook(s) into {out_dir}; "
        f"full log {run_log.path}")
    total = time.perf_counter()
    prov = manifest["provenance"]
    for i, nb in enumerate(nbs):
        say(f"[pipeline] notebook {i + 1}/{len(nbs)}: {nb} ...")
        try:
            wall = run_notebook(repo_root() / "notebooks" / nb,
                                out_dir / "executed" / (f"{label}__{nb}" if label else nb), params)
        except NotebookFailed as e:
            say(f"[pipeline] FAILED: {e}\n  full log: {run_log.path}", err=True)
            manifest["notebooks"][nb] = {"status": "failed", "error": str(e)}
            atomic_write_json(mpath, manifest)
            return 2 if e.user_error else 1
        walls[nb] = wall
        manifest["notebooks"][nb] = {"status": "ok", "wall_s": round(wall, 1), "git_commit": prov.get("git_commit")}
        say(f"[pipeline] {nb} done in {duration(wall)}{eta_line(walls, nbs[i + 1:], ref)}")
        if nb.startswith("01") and nb != nbs[-1]:  # the pools' sizes are known now, before any model loads
            from .data import load_manifest, size_checks

            errs = size_checks(load_manifest(out_dir), params)
            if errs:
                msg = (f"{len(errs)} parameter{'s' if len(errs) > 1 else ''} the prepared data cannot supply (the data "
                       "is prepared; no model was loaded, nothing scored or trained):\n  - " + "\n  - ".join(errs))
                say(f"[pipeline] stopped after {nb}: {msg}", err=True)
                manifest["stopped"] = msg
                atomic_write_json(mpath, manifest)
                return 2
    manifest["wall_s"] = round(time.perf_counter() - total, 1)  # this invocation
    manifest["notebooks_wall_s"] = round(sum(v.get("wall_s", 0.0) for v in manifest["notebooks"].values()), 1)
    atomic_write_json(mpath, manifest)
    say(f"[pipeline] all done in {duration(manifest['wall_s'])}; results in {out_dir}")
    return 0


def parameters_help() -> str:
    """Every notebook parameter: type, meaning and its value in each profile (for ``--help``)."""
    from .params import spec

    lines = ["notebook parameters (override with --set NAME=VALUE; values per profile: "
             + ", ".join(PROFILES) + "):"]
    for name, p in spec().items():
        kind = p.kind + (f"[{p.item}]" if p.item else "")
        choices = f" {{{', '.join(map(str, p.choices))}}}" if p.choices else ""
        values = " | ".join(repr(PROFILES[pr].get(name)) for pr in PROFILES)
        lines.append(f"  {name} ({kind}{choices}): {p.help}\n      {values}")
    return "\n".join(lines)


def version_string() -> str:
    from . import __version__
    from .store import git_commit

    return f"llmft-study {__version__} (git {git_commit() or 'unknown'})"


VERBS = {  # llmft-study VERB ...: what it does (verb_main has its function); `run` is also the bare form
    "run": "the study notebooks with a profile or a sweep file (also the bare form: llmft-study --profile ...)",
    "distill": "distil any prompt prefix into a saved student",
    "compare": "two results folders: rows, examples, verdicts",
    "profiles": "the profiles: what each runs and how long it took, where",
    "verify-student": "a saved student: checksums, plain load, accuracy",
}


def verbs_help() -> str:
    return "verbs:\n" + "\n".join(f"  {v:15s} {what}" for v, what in VERBS.items()) + \
        "\n  (llmft-study VERB --help for each)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = argv[0] if argv and argv[0] in VERBS else "run"
    if argv and verb == argv[0]:
        argv = argv[1:]
    return verb_main(verb)(argv)


def verb_main(verb: str):
    """The ``main(argv)`` of a verb (the modules of the other verbs load only when asked for)."""
    if verb == "distill":
        from .prompt_distill import main
    elif verb == "compare":
        from .compare import main
    elif verb == "verify-student":
        from .verify import main
    else:
        main = profiles_main if verb == "profiles" else run_main
    return main


def profiles_main(argv) -> int:
    """``llmft-study profiles [--json]``: each profile's grid and its measured time with host and date."""
    from .cli import HelpFormatter
    from .profiles import TIMINGS, profile_summary

    ap = argparse.ArgumentParser(prog="llmft-study profiles", formatter_class=HelpFormatter,
                                 description="The profiles (llmft_utils/profiles.py): what each runs and how long "
                                             "it took, on which host and when.")
    ap.add_argument("--json", action="store_true", help="print the profiles and their timings as JSON")
    a = ap.parse_args(argv)
    if a.json:
        import dataclasses

        print(json.dumps({n: {"parameters": PROFILES[n], "timing": dataclasses.asdict(TIMINGS[n]),
                              "time": TIMINGS[n].minutes()} for n in PROFILES}, indent=1))
        return 0
    for name in PROFILES:
        print(profile_summary(name))
    return 0


def run_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, add_config_flag

    ap = argparse.ArgumentParser(prog="llmft-study [run]", description=__doc__ + "\n" + verbs_help(),
                                 epilog=parameters_help(), formatter_class=HelpFormatter)
    add_config_flag(ap, "flags and notebook parameters")
    ap.add_argument("--profile", default=None, choices=sorted(PROFILES),
                    help="the parameter set to run (required unless --sweep names one); see `llmft-study profiles`")
    ap.add_argument("--sweep", default=None, metavar="FILE.json", help="run every parameter set in this file")
    ap.add_argument("--only", nargs="*", default=None, help="notebook prefixes to run, e.g. 01 02")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a notebook parameter (Python literal), e.g. --set ks=[0,4]")
    ap.add_argument("--force", action="store_true", help="recompute rows that already exist")
    ap.add_argument("--list-profiles", action="store_true", help="list the profiles and exit (= llmft-study profiles)")
    ap.add_argument("--version", action="version", version=version_string())
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v: debug)")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return ap


def run_main(argv) -> int:
    from .cli import parse
    from .profiles import time_hint

    ap = run_parser()
    a, config_params = parse(ap, argv, extra=True)  # a config file's notebook parameters rank below --set
    if a.list_profiles:
        return profiles_main([])
    if a.profile is None and a.sweep is None:
        ap.error("choose what to run: --profile " + "|".join(PROFILES) + f" (measured: {time_hint()}; "
                 "`llmft-study profiles` says where and when), or --sweep FILE.json")
    explicit_profile = a.profile  # given on the command line: it wins over a sweep file's own
    a.profile = a.profile or "default"  # a sweep file names its own profile; this is its fallback
    import logging

    level = logging.WARNING if a.quiet else (logging.DEBUG if a.verbose else logging.INFO)
    setup_terminal(a.verbose, a.quiet)

    os.environ[logs.ENV] = logging.getLevelName(level).lower()  # the notebook kernels' library verbosity
    logs.set_verbosity(os.environ[logs.ENV])
    for noisy in ("httpx", "urllib3", "filelock", "traitlets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .params import ParameterError

    overrides = {**config_params, **parse_sets(ap, a.set)}
    runs = [("", a.profile, overrides)]
    if a.sweep is not None:
        runs = read_sweep(a.sweep, a.profile, overrides, ap, profile=explicit_profile)
    nbs = select_notebooks(a.only)
    problems = []
    for label, profile, over in runs:  # every run is checked before the first one starts
        try:
            check_run(resolve_params(profile, over, a.force), nbs)
        except ParameterError as e:
            problems.append(f"{a.sweep + ', ' + label + ': ' if label else ''}{e}")
    if problems:
        print("[pipeline] nothing was run:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    for i, (label, profile, over) in enumerate(runs):
        rc = run_profile(profile, over, a.only, a.force, label=label)
        if rc:
            if label:
                print(f"[pipeline] sweep stopped at {label} ({i + 1}/{len(runs)})", file=sys.stderr)
            return rc
    return 0


def parse_sets(ap, sets: list) -> dict:
    """``--set KEY=VALUE`` arguments as parameter overrides (values read as the parameter's type)."""
    from .params import coerce_cli

    out = {}
    for kv in sets:
        if "=" not in kv:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = coerce_cli(k.strip(), v)
    return out


def read_sweep(path: str, default_profile: str, overrides: dict, ap, profile: str | None = None) -> list:
    """``[(label, profile, parameters)]`` of a sweep file; ``overrides`` (from --set) apply to every run. The
    profile: ``profile`` (``--profile``) when given, else the file's own, else ``default_profile``."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"{path}: cannot read the sweep file ({e})")
    profile = profile or (spec.get("profile", default_profile) if isinstance(spec, dict) else default_profile)
    if profile not in PROFILES:
        ap.error(f"{path}: unknown profile {profile!r}")
    runs = spec.get("runs") if isinstance(spec, dict) else None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        ap.error(f"{path}: expected {{\"runs\": [{{...parameters...}}, ...]}}")
    out = []
    for i, run in enumerate(runs):
        run = dict(run)
        out.append((str(run.pop("label", f"run{i:02d}")), profile, {**run, **overrides}))
    return out


if __name__ == "__main__":
    sys.exit(main())
