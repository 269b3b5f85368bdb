"""Saved students: the product of context distillation, as a plain Hugging Face model folder.

A saved student is what ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` load with transformers alone (safetensors weights in the
precision it was evaluated in, its tokenizer), plus ``README.md`` (a model card: base model, teacher,
demonstrations, recipe, metrics, the command that made it, how to prompt it) and ``student.json`` (the
same facts, machine-readable). Folders are written whole or not at all.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SAVE_STUDENTS = ("none", "first", "first_seed", "all")


def should_save(choice: str, method: str, task: str, k: int, seed: int, plan) -> bool:
    """Whether the sweep keeps this student. ``none``; ``first``: per training task, the CD student of the
    first seed with the most teacher demonstrations (PBFT's first seed where a task has no CD student);
    ``first_seed``: every student of the first seed; ``all``. ``plan``: the sweep's
    ``(method, task, k, seed)`` tuples, in order."""
    if choice not in SAVE_STUDENTS:
        raise ValueError(f"save_students must be one of {SAVE_STUDENTS}, got {choice!r}")
    if choice == "none":
        return False
    if choice == "all":
        return True
    first_seed = plan[0][3] if plan else seed
    if choice == "first_seed":
        return seed == first_seed
    mine = [p for p in plan if p[1] == task and p[3] == first_seed]
    cd = [p for p in mine if p[0] == "cd"]
    pick = max(cd, key=lambda p: p[2]) if cd else (mine[0] if mine else None)
    return pick == (method, task, k, seed)


def plain_model(model):
    """``model`` as a plain transformers model that ``save_pretrained`` accepts: a model loaded from a GGUF
    file keeps its quantizer and ``quantization_config`` although its weights are de-quantised floats;
    both are dropped (in place)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def model_card(info: dict) -> str:
    """The README.md of a saved student, from its ``student.json`` facts."""
    m = info["metrics"]
    rows = "\n".join(f"| {es} | {v['n']} | {_fmt(v.get('score_acc'))} | {_fmt(v.get('zeroshot_acc'))} | "
                     f"{_fmt(v.get('teacher_acc'))} | {_fmt(v.get('agree_teacher_student'))} | "
                     f"{_fmt(v.get('kl_teacher_student'))} |" for es, v in m.items())
    cfg = "\n".join(f"  {k}: {v}" for k, v in info["recipe"].items())
    if info.get("prefix") is not None:
        teacher = f"the frozen base model prompted with a given prefix of {len(info['prefix'])} characters (in student.json)"
    elif info["method"] == "cd":
        teacher = (f"the frozen base model prompted with k = {info['k']} labelled demonstrations from "
                   f"`{info['demo_pool']}` (ids {info['demo_ids']})")
    else:
        teacher = f"none: pattern-based fine-tuning on k = {info['k']} labelled examples (ids {info['demo_ids']})"
    title = (f"{info['train_task']}, k = {info['k']}, seed {info['seed']}" if info.get("prefix") is None
             else "a distilled prompt")
    return card_metadata(info) + f"""
# {info['method'].upper()} student: {title}

A copy of `{info['base_model']}` fine-tuned {'by context distillation: it answers' if info['method'] == 'cd' else 'on labelled examples: it answers'}
zero-shot, without demonstrations in its prompt. Written by the llmft study kit.

- base model: `{info['base_model']}` ({info['base_model_source']})
- teacher: {teacher}
- training queries: {info['n_train']} {('unlabelled queries' if info.get('prefix') is not None else 'unlabelled transfer queries from `' + info['demo_pool'] + '`') if info['method'] == 'cd' else 'labelled examples'}
- pattern `{info['pattern']['name']}`: `{info['pattern']['template']!r}`, verbalizers {info['pattern']['verbalizers']} (score: the verbalizer with the higher log-probability after the prompt)
- weights: {info['dtype']} (trained with float32 master weights), evaluated on {info['device']}

## Metrics (accuracy on the evaluation sets; agreement and KL with its ICL teacher)

| eval set | n | accuracy | zero-shot | teacher | agreement with teacher | KL(teacher‖student) |
|---|---|---|---|---|---|---|
{rows}

## Recipe

```
{cfg}
```

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{info['folder_name']}")
tok = AutoTokenizer.from_pretrained("{info['folder_name']}")
prompt = {info['pattern']['template']!r}.format(premise="A man is sleeping.", hypothesis="A man rests.")
# compare the log-probabilities of {info['pattern']['verbalizers']} as the next tokens after `prompt`
```

Made by: `{info['command']}` (git {info['provenance'].get('git_commit', '?')}, torch {info['provenance'].get('torch', '?')},
transformers {info['provenance'].get('transformers', '?')}); run key `{info['student_key']}`.
"""


def card_metadata(info: dict) -> str:
    """The card's YAML front matter, written by ``huggingface_hub``'s :class:`ModelCardData` (the Hub's own
    fields and quoting: a base model named ``random:tiny-llama`` or ``org/name: x`` stays valid YAML)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=info["base_model_reference"] or info["base_model"], library_name="transformers",
                         tags=["context-distillation", "nli", "llmft-study"])
    return f"---\n{data.to_yaml()}\n---\n"


def run_command(argv=None) -> str:
    """The command line that made a student, with paths as :func:`store.portable` writes them (a kernel's
    ``sys.argv`` is ``/abs/.../ipykernel_launcher.py -f /abs/.../kernel-x.json``)."""
    from ..store import portable

    return " ".join(portable(a) if a.startswith("/") else a for a in (sys.argv if argv is None else argv))


def _fmt(v) -> str:
    return "–" if v is None or v != v else f"{v:.4f}"


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


def weight_digests(folder) -> dict:
    """``{file name: sha256}`` of every weight file of a saved model folder."""
    from ..data import file_sha256

    return {f.name: file_sha256(f) for pattern in WEIGHT_PATTERNS for f in sorted(Path(folder).glob(pattern))}


def check_weights(folder) -> list[str]:
    """What is wrong with a saved student's weight files against the sha256 its ``student.json`` records
    (empty: every file is there, unchanged). A student saved before digests were recorded: one line saying so."""
    info = json.loads((Path(folder) / "student.json").read_text())
    want = info.get("weights_sha256")
    if not want:
        return [f"{folder}/student.json records no weights_sha256 (saved by an older version): cannot check the weights"]
    have = weight_digests(folder)
    problems = [f"{folder}/{name}: missing" for name in want if name not in have]
    problems += [f"{folder}/{name}: sha256 {have[name][:12]}... differs from the {want[name][:12]}... recorded at saving "
                 "(truncated or changed)" for name in want if name in have and have[name] != want[name]]
    problems += [f"{folder}/{name}: a weight file student.json does not record" for name in have if name not in want]
    return problems


def save_student(model, tokenizer, folder: Path, info: dict) -> Path:
    """Write ``model`` (weights as they are), ``tokenizer``, ``student.json`` (with the sha256 of every weight
    file, see :func:`check_weights`) and the model card into ``folder``, whole or not at all
    (:func:`store.atomic_folder`: a temporary folder beside it replaces ``folder`` and any older student
    there once complete)."""
    from ..store import atomic_folder

    folder = Path(folder)
    info = {**info, "folder_name": folder.name, "command": info.get("command") or run_command()}
    with atomic_folder(folder) as tmp:
        plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["weights_sha256"] = weight_digests(tmp)
        (tmp / "student.json").write_text(json.dumps(info, indent=1, default=str))
        (tmp / "README.md").write_text(model_card(info))
    return folder
