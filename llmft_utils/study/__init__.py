"""The study: plans, resume keys, result rows, the ICL and CD sweeps and the recipe selection, above the
algorithms of :mod:`llmft_utils.scoring` and :mod:`llmft_utils.distill`."""
