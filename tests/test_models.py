import pytest
from transformers import PreTrainedTokenizerFast

from llmft_utils import data, models

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


def test_tiny_models_build():
    tok = models.tiny_tokenizer()
    for arch in ("opt", "llama"):
        m = models.tiny_model(arch, tok)
        assert m.config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        models.tiny_model("gpt5", tok)
