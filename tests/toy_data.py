"""Random NLI-shaped frames for the tests (an evaluation set and a demonstration pool, deterministic)."""
import numpy as np
import pandas as pd

WORDS = "the cat dog man woman sat ran saw on in a park doctor president student".split()


def frames(n_eval: int = 12, n_pool: int = 20, seed: int = 0, premise=(4, 14), hypothesis=(2, 6)):
    """``(eval_df, pool_df)`` with idx 0.. and 100.., premises of ``premise`` words and hypotheses of
    ``hypothesis`` words (half-open ranges), labels alternating 0, 1."""
    rng = np.random.default_rng(seed)
    sent = lambda k: " ".join(rng.choice(WORDS, k)).capitalize() + " ."
    mk = lambda n, off: pd.DataFrame({"idx": range(off, off + n),
                                      "premise": [sent(int(rng.integers(*premise))) for _ in range(n)],
                                      "hypothesis": [sent(int(rng.integers(*hypothesis))) for _ in range(n)],
                                      "label": [i % 2 for i in range(n)]})
    return mk(n_eval, 0), mk(n_pool, 100)


def results_folder(tmp_path, n: int = 6, max_positions: int = 48, n_pool: int = 20):
    """``(lm, folder)``: a tiny random Llama with a ``max_positions`` context and a results folder whose manifest
    holds one toy evaluation set (``toy/validation``, n rows) and its demonstration pool (``toy/train``), laid out
    as notebook 01 writes them."""
    from llmft_utils import data, models, store

    tok = models.tiny_tokenizer()
    lm = models.wrap(models.tiny_model("llama", tok, max_positions=max_positions), tok, name="tiny-llama")
    words = "the cat dog man woman sat ran saw on in a park".split()
    rng = np.random.default_rng(0)
    mk = lambda n, off, m: pd.DataFrame({"idx": range(off, off + n),
                                         "premise": [" ".join(rng.choice(words, m)) for _ in range(n)],
                                         "hypothesis": [" ".join(rng.choice(words, 3)) for _ in range(n)],
                                         "label": [i % 2 for i in range(n)]})
    ev, pool = mk(n, 0, 6), mk(n_pool, 100, 12)
    out = tmp_path / "res"
    data.write_jsonl(ev, out / "prepared/toy__validation.jsonl")
    data.write_jsonl(pool, out / "prepared/toy__train.jsonl")
    manifest = {"eval_sets": {"toy/validation": {"file": "prepared/toy__validation.jsonl", "task": "toy",
                                                 "split": "validation", "full_size": n, "subsampled": False,
                                                 "ids_digest": store.ids_digest(ev["idx"]), "demo_pool": "toy/train",
                                                 **data.label_stats(ev)}},
                "demo_pools": {"toy/train": {"file": "prepared/toy__train.jsonl", **data.label_stats(pool)}}}
    store.atomic_write_json(out / "manifest.json", manifest)
    return lm, out
