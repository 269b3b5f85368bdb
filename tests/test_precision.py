"""A 16-bit run says what its precision costs and records it: every ICL row and every student row of a
bfloat16 run holds the share of its first queries that the same weights in float32 answer otherwise."""
import dataclasses

import pandas as pd
import toy_data

from llmft_utils import distill
from llmft_utils.study import cd_sweep, icl_sweep
from llmft_utils.study.plan import CDPlan, EvalOptions, ICLPlan

PLAN = ICLPlan("gpt-3", [0, 2], [0, 1])


def test_bfloat16_rows_record_the_flips_float32_would_not_make(tmp_path, caplog):
    lm, out32 = toy_data.results_folder(tmp_path / "f32", n=12, max_positions=512, n_pool=30)
    _, out16 = toy_data.results_folder(tmp_path / "b16", n=12, max_positions=512, n_pool=30)
    lm16 = dataclasses.replace(lm, model=distill.training.float32_copy(lm.model).bfloat16(), dtype="bfloat16")
    # the reference: the bfloat16 weights themselves, in float32 (what the run compares itself with)
    lm32 = dataclasses.replace(lm, model=distill.training.float32_copy(lm16.model), dtype="float32")
    ev = EvalOptions(progress=False, fidelity_sample=8)
    ref = icl_sweep.run_sweep(lm32, out32, PLAN, ev)
    with caplog.at_level("WARNING"):
        half = icl_sweep.run_sweep(lm16, out16, PLAN, ev)
    assert any("fidelity_flip_rate" in r.getMessage() for r in caplog.records)  # the notice
    assert "fidelity_flip_rate" not in ref  # float32 rows are their own reference
    for (_, a), (_, b) in zip(ref.sort_values(["k", "seed"]).iterrows(), half.sort_values(["k", "seed"]).iterrows()):
        pa, pb = (pd.read_parquet(o / r["predictions_file"]).head(8) for o, r in ((out32, a), (out16, b)))
        assert b["fidelity_n"] == 8 and b["fidelity_reference"] == "float32"
        assert b["fidelity_flip_rate"] == (pa["pred"].to_numpy() != pb["pred"].to_numpy()).mean()
        dl = (pa[["logp_label0", "logp_label1"]].to_numpy() - pb[["logp_label0", "logp_label1"]].to_numpy())
        assert b["fidelity_max_dlogp"] == abs(dl).max() > 0  # bfloat16 does move the scores
    cd = cd_sweep.run_cd_sweep(lm16, out16, CDPlan("gpt-3", ["toy"], [2], [0], 8, 0,
                                                   distill.DistillConfig(target="verbalizer", epochs=1, batch_size=4), 1), ev)
    assert (cd["fidelity_n"] == 8).all() and cd["fidelity_flip_rate"].between(0, 1).all()
