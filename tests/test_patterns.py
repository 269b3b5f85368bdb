import pandas as pd
import pytest

from llmft_utils import patterns


def test_llmft_patterns_verbatim():
    g = patterns.get_pattern("gpt-3")
    assert g.query("P.", "H.") == "P. question: H. Yes or No? answer:"
    assert g.demonstration("P.", "H.", 0) == "P. question: H. Yes or No? answer: Yes"
    assert g.demonstration("P.", "H.", 1).endswith("answer: No")
    assert patterns.get_pattern("minimal").demonstration("P.", "H.", 1) == "P. H. ? No"
    eh = patterns.get_pattern("eval-harness")
    assert eh.demonstration("P.", "H.", 0) == "P. \nQuestion: H. True or False?\nAnswer: True"
    assert eh.verbalizers == (" True", " False")


def test_prefix_and_query_join():
    g = patterns.get_pattern("gpt-3")
    demos = pd.DataFrame({"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [1, 0]})
    prefix = patterns.build_prefix(g, demos)
    assert prefix == "a question: c Yes or No? answer: No\n\nb question: d Yes or No? answer: Yes"
    assert patterns.build_prefix(g, demos.iloc[0:0]) == ""
    q = patterns.query_text(g, "x", "y", has_prefix=True)
    assert prefix + q == prefix + "\n\nx question: y Yes or No? answer:"
    assert patterns.query_text(g, "x", "y", has_prefix=False) == "x question: y Yes or No? answer:"


def test_unknown_pattern():
    with pytest.raises(ValueError, match="unknown pattern 'gpt-4'.*minimal"):
        patterns.get_pattern("gpt-4")


@pytest.mark.parametrize("name", list(patterns.PATTERNS))
def test_verbalizers_single_token_for_smollm2(smollm2_tokenizer, name):
    p = patterns.get_pattern(name)
    ids = patterns.verbalizer_token_ids(smollm2_tokenizer, p, p.query("A man.", "A person."))
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
