"""Quality regression: the shipped synthetic CLIP must keep localising objects through the whole pipeline, and the
shipped heads trained on its seeds must keep beating them.

Scored on the first :data:`SCENES` held-out scenes (seed ``HELD_OUT_SEED``, never trained on), B = 48 attributes.
Measured with the shipped files (see the README's ablation table for 500 scenes):

=====================================================  ========  =======  ==========================
figure                                                 measured  floor    margin
=====================================================  ========  =======  ==========================
full training-free ExCEL seeds (SVC + TSE + refinement)  {full}   FULL     see the constants below
ExCEL seeds − plain CLIP seeds (SVC, TSE off)            {gain}   GAIN
trained segmenter (single scale, no image labels)        {seg}    TRAINED
trained segmenter − ExCEL seeds (the order)              {order}  > 0
=====================================================  ========  =======  ==========================

The floors sit several points under the measured values so that thread-count and BLAS differences (a few tenths
of a point here) cannot trip them, while breaking SVC, TSE, the alignment, the refinement or the heads (each worth
many points) does. The segmenter is scored at one scale without flip to keep the test fast; the README's figures
use the shipped multi-scale settings.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from excelseg.config import load_config
from excelseg.predictor import CamPredictor
from excelseg.segmenter import Segmenter
from excelseg.synthetic import held_out_samples, synthetic_vocabulary
from excelseg.synthetic.knowledge import synthetic_bank
from excelseg.synthetic.seeds import seed_miou, segmenter_miou
from excelseg.synthetic.trained import heads_path, load_trained
from excelseg.weights import NAMED_WEIGHTS, WeightsNotFoundError, load_clip

SCENES = 50
FULL_FLOOR = 0.25
GAIN_FLOOR = 0.10
TRAINED_FLOOR = 0.30


@pytest.fixture(scope="module")
def clip():
    try:
        return load_clip("synthetic")
    except WeightsNotFoundError:
        pytest.skip(f"shipped synthetic CLIP ({NAMED_WEIGHTS['synthetic']}) is not in this installation")


@pytest.fixture(scope="module")
def scores(clip, tmp_path_factory):
    vocab = synthetic_vocabulary()
    full = load_config("synthetic")
    bank = synthetic_bank(clip, cache_dir=str(tmp_path_factory.mktemp("cache")))
    plain = full.with_(cam=replace(full.cam, svc_last_blocks=0))
    size = clip.image_size[0]
    return {
        "excel": seed_miou(CamPredictor(clip, bank=bank, config=full, device="cpu"), held_out_samples(SCENES, size),
                           vocab)["miou"],
        "plain": seed_miou(CamPredictor(clip, config=plain, device="cpu"), held_out_samples(SCENES, size),
                           vocab)["miou"],
        "vocab": vocab,
    }


def test_shipped_synthetic_clip_seed_miou(scores):
    assert scores["excel"] >= FULL_FLOOR, f"ExCEL seed mIoU {scores['excel']:.3f} fell below {FULL_FLOOR}"
    assert scores["excel"] - scores["plain"] >= GAIN_FLOOR, (scores["excel"], scores["plain"])


def test_shipped_heads_beat_the_seeds_they_learned_from(clip, scores):
    if not heads_path().is_file():
        pytest.skip("shipped synthetic heads are not in this installation")
    trained = load_trained(clip)
    cfg = trained["checkpoint"].config
    fast = cfg.with_(segment=replace(cfg.segment, scales=(1.0,), flip=False))
    segmenter = Segmenter(clip, trained["checkpoint"].heads(), trained["checkpoint"].class_names, config=fast,
                          device="cpu")
    seg = segmenter_miou(segmenter, held_out_samples(SCENES, clip.image_size[0]), scores["vocab"])["miou"]
    assert seg >= TRAINED_FLOOR, f"trained segmenter mIoU {seg:.3f} fell below {TRAINED_FLOOR}"
    assert seg > scores["excel"], f"trained segmenter {seg:.3f} no longer beats its seeds {scores['excel']:.3f}"
