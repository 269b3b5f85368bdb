import pytest
import torch
from transformers import PreTrainedTokenizerFast

from llmft_utils import data, models
from llmft_utils.study.plan import EvalOptions, ICLPlan

SHARED_TOK = models.Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "smollm2-135m-instruct-tokenizer"


@pytest.mark.skipif(not SHARED_TOK.is_dir(), reason="original SmolLM2 tokenizer files not available")
def test_embedded_tokenizer_matches_original(smollm2_tokenizer, data_dir):
    ref = PreTrainedTokenizerFast.from_pretrained(SHARED_TOK)
    texts = ["A man sat, 12  3 question: is ½ OK? Yes or No? answer: Yes", "Costs rose 1,250% in 2003 ²."]
    for task, split in (("rte", "validation"), ("mnli", "validation_matched"), ("hans", "validation")):
        df = data.load_split(task, split, data_dir).head(300)
        texts += list(df.premise) + list(df.hypothesis)
    got = smollm2_tokenizer(texts, add_special_tokens=True)["input_ids"]
    want = ref(texts, add_special_tokens=True)["input_ids"]
    bad = [t for t, a, b in zip(texts, got, want) if a != b]
    assert not bad, f"{len(bad)} texts tokenise differently, e.g. {bad[0]!r}"


def test_local_directory_and_errors(tmp_path):
    tok = models.tiny_tokenizer(add_bos=True)
    m = models.tiny_model("opt", tok)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = models.load_model(str(tmp_path), device="cpu")
    assert lm.source.startswith("dir:") and lm.max_context == 512 and lm.n_params == sum(p.numel() for p in m.parameters())
    with pytest.raises(models.ModelError, match="smollm2-135m"):
        models.load_model("no-such-org/no-such-model-xyz", device="cpu")
    with pytest.raises(models.ModelError, match="unknown dtype"):
        models.load_model(str(tmp_path), dtype="float8")
    assert lm.dtype == "float32"  # auto on a CPU: float32, and recorded as such


def test_auto_precision_is_tf32_on_cuda_and_float32_elsewhere(monkeypatch):
    """``dtype="auto"`` resolves by device (TF32 matmuls on CUDA were measured to keep >= 99% of the CPU's
    predictions); explicit names pass through; the tensor dtype of the weights is float32 for both."""
    assert models.resolve_dtype("auto", "cuda") == models.resolve_dtype("auto", "cuda:1") == "tf32"
    assert models.resolve_dtype("auto", "cpu") == "float32" and models.resolve_dtype("auto", "mps") == "float32"
    assert models.resolve_dtype("float32", "cuda") == "float32" and models.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert models.pick_dtype("auto", "cuda") == models.pick_dtype("tf32", "cuda") == torch.float32
    seen = []  # load_model switches TF32 on for auto on CUDA (checked without a GPU: the switch is recorded)
    monkeypatch.setattr(models, "set_tf32", seen.append)
    monkeypatch.setattr(models, "pick_device", lambda d: "cuda")
    with pytest.raises(Exception):
        models.load_model("no-such-dir-xyz", dtype="auto")
    assert seen == [True]


def test_tiny_models_build():
    tok = models.tiny_tokenizer()
    for arch in models.TINY_ARCHS:
        m = models.tiny_model(arch, tok)
        assert m.config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        models.tiny_model("gpt5", tok)


def test_random_init_shapes_have_the_real_parameter_counts():
    """``random:<shape>`` models have the real models' sizes: SmolLM2-135M as the embedded model loads
    (n_params in results/reference/icl.csv), OPT-125m and OPT-1.3b as published on the Hub, Qwen2.5-Coder-0.5B
    as its fetched GGUF file loads (untied output matrix: 494,032,768 + 151,936 x 896; tests/test_qwen.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    want = {"smollm2-135m": 134_515_008, "opt-125m": 125_239_296, "opt-1.3b": 1_315_758_080,
            "qwen2.5-coder-0.5b": 630_167_424}
    assert set(want) == set(models.SHAPES)
    for shape, n in want.items():
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(models.shape_config(shape))
        assert sum(p.numel() for p in m.parameters()) == n, shape
    assert models.check_model_name("random:opt-125m") == "random"
    with pytest.raises(models.ModelError, match="unknown shape 'gpt-9'.*smollm2-135m, opt-125m, opt-1.3b"):
        models.check_model_name("random:gpt-9")


def test_random_init_rows_are_marked_and_keyed_apart(tmp_path, monkeypatch):
    """A random-init model's ICL rows carry its ``random:`` name (so their resume keys never match real
    weights' rows) and ``random_init = True``; ``dtype="tf32"`` is recorded as such (its own keys)."""
    import toy_data

    from llmft_utils.study import icl_sweep

    tok = models.tiny_tokenizer()
    monkeypatch.setattr(models, "random_model", lambda shape, device, dtype, seed=0: models.tiny_model("llama", tok))
    monkeypatch.setattr(models, "_random_tokenizer", lambda: (tok, "memory"))
    lm = models.load_model("random:smollm2-135m", device="cpu", dtype="tf32")
    assert lm.source.startswith("random-init:smollm2-135m") and lm.dtype == "tf32" and lm.info["random_init"]
    _, out = toy_data.results_folder(tmp_path)
    rows = icl_sweep.run_sweep(lm, out, ICLPlan("gpt-3", [0], [0]), EvalOptions(progress=False))
    assert rows["random_init"].all() and (rows["model"] == "random:smollm2-135m").all()
    assert rows["run_key"].str.contains("random:smollm2-135m").all() and rows["run_key"].str.endswith("tf32@cpu").all()


def test_dequantised_copy_computes_the_gguf_weights_bit_for_bit(tmp_path, monkeypatch):
    """The first load of the embedded model de-quantises its GGUF file and keeps a float32 copy; a later load
    reads the copy: the same tensors (name, dtype, bytes), the same weights sha256, the same tokenizer."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    first = models.load_model("smollm2-135m", device="cpu")
    assert first.info["loaded_from"] == "gguf"
    folder = models.embedded_cache_dir("smollm2-135m")
    assert folder.parent == tmp_path / "embedded" and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    second = models.load_model("smollm2-135m", device="cpu")
    assert second.info["loaded_from"] == "cache"
    ref = first.model.state_dict()  # transformers' own GGUF load (models._dequantise)
    got = second.model.state_dict()
    assert list(got) == list(ref)
    assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
    assert second.model.lm_head.weight.data_ptr() == second.model.model.embed_tokens.weight.data_ptr()  # still tied
    assert models.weights_sha256(second) == models.weights_sha256(first) == models.state_sha256(first.model)
    texts = ["A man sat, 12  3 question: is ½ OK? Yes or No? answer: Yes", "Costs rose 1,250% in 2003 ²."]
    assert second.tokenizer(texts)["input_ids"] == first.tokenizer(texts)["input_ids"]
    assert second.tokenizer.backend_tokenizer.to_str() == first.tokenizer.backend_tokenizer.to_str()
    assert second.tokenizer.pad_token == first.tokenizer.pad_token
    bf16 = models.load_model("smollm2-135m", device="cpu", dtype="bfloat16")  # the cast of the same float32 tensors
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.model.lm_head.weight, ref["lm_head.weight"].to(torch.bfloat16))


def test_a_damaged_dequantised_copy_is_found_and_rebuilt(tmp_path, monkeypatch):
    """Weights that are not the recorded ones (here: one weight changed in the copy) are never used: the
    load warns, de-quantises the GGUF file again and replaces the copy. With the cache off nothing is written."""
    import safetensors.torch as st

    calls = []

    def dequantise(name, path):  # stands in for the 15-s GGUF read: a tiny model with fixed weights
        calls.append(name)
        tok = models.tiny_tokenizer()
        return models.tiny_model("llama", tok, seed=0), tok

    monkeypatch.setattr(models, "_dequantise", dequantise)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    a = models.load_model("smollm2-135m", device="cpu")
    folder = models.embedded_cache_dir("smollm2-135m")
    b = models.load_model("smollm2-135m", device="cpu")
    assert (a.info["loaded_from"], b.info["loaded_from"], len(calls)) == ("gguf", "cache", 1)
    weights = st.load_file(folder / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    st.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="damaged"):
        c = models.load_model("smollm2-135m", device="cpu")
    assert c.info["loaded_from"] == "gguf" and len(calls) == 2
    assert models.weights_sha256(c) == models.weights_sha256(a)
    assert models.load_model("smollm2-135m", device="cpu").info["loaded_from"] == "cache"  # the rebuilt copy
    monkeypatch.setenv(models.CACHE_ENV, "off")
    assert models.embedded_cache_dir("smollm2-135m") is None
    assert models.load_model("smollm2-135m", device="cpu").info["loaded_from"] == "gguf" and len(calls) == 3


def test_a_model_folder_without_tokenizer_files_is_named_before_loading(tmp_path):
    from llmft_utils import params

    models.tiny_model("opt", models.tiny_tokenizer()).save_pretrained(tmp_path)  # weights and config, no tokenizer
    with pytest.raises(models.ModelError, match="no tokenizer files.*tokenizer.save_pretrained"):
        models.check_model_name(str(tmp_path))
    with pytest.raises(models.ModelError, match="no tokenizer files"):
        models.load_model(str(tmp_path), device="cpu")
    with pytest.raises(params.ParameterError, match="model: .*no tokenizer files"):
        params.validate({"model": str(tmp_path)})
