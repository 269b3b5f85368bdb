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
