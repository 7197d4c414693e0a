"""Tests for vpdm.data.layouts: real-data counts, layouts, every bad-input error, and the synthetic demo."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from scipy import ndimage

from vpdm.data.dataset import AnomalyDataset, check_images
from vpdm.data.demo import demo_root, make_demo_dataset
from vpdm.data.layouts import Sample, categories, list_samples, parse_data_spec
from vpdm.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rgb(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mask(size: int = 16) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    m[4:8, 4:8] = 255
    return m


def make_tree(root: Path, *, n_train: int = 2, defects: tuple[str, ...] = ("crack",), masks: bool = True) -> Path:
    """Tiny MVTec-layout category: train/good, test/good, test/<defect> with masks."""
    for i in range(n_train):
        _png(root / "train" / "good" / f"{i:03d}.png", _rgb(i))
    _png(root / "test" / "good" / "000.png", _rgb(100))
    for d in defects:
        _png(root / "test" / d / "000.png", _rgb(200))
        if masks:
            _png(root / "ground_truth" / d / "000_mask.png", _mask())
    return root


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------


def test_bottle_counts_match_readme(shared_data: Path) -> None:
    spec = f"mvtec:{shared_data / 'mvtec_ad'}"
    train, test = list_samples(spec, "train"), list_samples(spec, "test")
    assert len(train) == 209 and all(s.label == 0 and s.mask_path is None for s in train)
    assert len(test) == 83 and sum(s.label for s in test) == 63
    assert categories(test) == ["mvtec/bottle"]
    per_defect = {d: sum(s.defect == d for s in test) for d in {s.defect for s in test}}
    assert per_defect == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert test == sorted(test, key=lambda s: (s.category, str(s.image_path)))  # deterministic order


def test_bottle_masks_zero_for_good_binary_nonempty_for_anomalies(shared_data: Path) -> None:
    test = list_samples(f"mvtec:{shared_data / 'mvtec_ad' / 'bottle'}", "test")
    ds = AnomalyDataset(test, image_size=64, mask_size=64)
    for i, s in enumerate(test):
        m = ds.mask_array(i)
        assert m.shape == (64, 64)
        if s.label == 0:
            assert s.mask_path is None and m.sum() == 0
        else:
            assert set(np.unique(m)) == {0, 1}, s.image_path
    item = ds[len(ds) - 1]
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 64, 64)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_magnetic_tile_grayscale_becomes_rgb(shared_data: Path) -> None:
    test = list_samples(f"mtd:{shared_data / 'magnetic_tile'}", "test")
    assert len(test) == 582 and sum(s.label for s in test) == 392
    with Image.open(test[0].image_path) as im:
        assert im.mode == "L"
    ds = AnomalyDataset(test[:1], image_size=32, normalize=False)
    img = ds[0]["image"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert ds.raw_image(0).shape == (32, 32, 3) and ds.raw_image(0).dtype == np.uint8


def test_union_keeps_both_categories_and_class_indices(shared_data: Path) -> None:
    spec = f"mvtec:{shared_data / 'mvtec_ad'},mpdd:{shared_data / 'mpdd' / 'metal_plate'}"
    train = list_samples(spec, "train")
    assert categories(train) == ["mpdd/metal_plate", "mvtec/bottle"]
    assert len(train) == 209 + 54
    ds = AnomalyDataset(train, image_size=32)
    assert ds.categories == ["mpdd/metal_plate", "mvtec/bottle"]
    first, last = ds[0], ds[len(ds) - 1]
    assert (first["category"], first["class_index"]) == ("mpdd/metal_plate", 0)
    assert (last["category"], last["class_index"]) == ("mvtec/bottle", 1)
    # root + the same category dir again: listed once, not twice
    dup = list_samples(f"mvtec:{shared_data / 'mvtec_ad'},mvtec:{shared_data / 'mvtec_ad' / 'bottle'}", "train")
    assert len(dup) == 209


def test_item_normalisation(shared_data: Path) -> None:
    s = list_samples(f"mvtec:{shared_data / 'mvtec_ad'}", "train")[:1]
    raw = AnomalyDataset(s, image_size=32, normalize=False)[0]["image"]
    norm = AnomalyDataset(s, image_size=32)[0]["image"]
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(norm, (raw - mean) / std, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# spec parsing and layouts
# ---------------------------------------------------------------------------------------------


def test_parse_spec_kinds_and_errors(tmp_path: Path) -> None:
    make_tree(tmp_path / "bottle")
    pairs = parse_data_spec(f"mvtec:{tmp_path}, folder:{tmp_path / 'bottle'}, mvtec:{tmp_path}")
    assert pairs == [("mvtec", tmp_path), ("folder", tmp_path / "bottle")]
    assert parse_data_spec("demo") == [("demo", demo_root())]
    with pytest.raises(DataError, match="nosuch") as e:
        parse_data_spec(f"mvtec:{tmp_path / 'nosuch'}")
    assert "does not exist" in str(e.value)
    with pytest.raises(DataError, match=r"'imagenet:.*mvtec.*visa.*folder.*demo"):
        parse_data_spec(f"imagenet:{tmp_path}")
    with pytest.raises(DataError, match="unknown data spec prefix"):
        parse_data_spec(str(tmp_path))  # no prefix at all
    with pytest.raises(DataError, match="empty"):
        parse_data_spec(" ")
    with pytest.raises(ConfigError, match="'val'"):
        list_samples(f"mvtec:{tmp_path}", "val")  # type: ignore[arg-type]


def test_same_category_from_two_roots_disambiguated(tmp_path: Path) -> None:
    make_tree(tmp_path / "a" / "bottle")
    make_tree(tmp_path / "b" / "bottle", n_train=3)
    spec = f"mvtec:{tmp_path / 'a'},mvtec:{tmp_path / 'b' / 'bottle'}"
    train = list_samples(spec, "train")
    assert categories(train) == ["mvtec/bottle", "mvtec/bottle#2"]
    assert sum(s.category == "mvtec/bottle#2" for s in train) == 3
    assert list_samples(spec, "train") == train  # deterministic


def test_folder_layout_refuses_a_defect_image_without_mask_by_default(tmp_path: Path) -> None:
    """Without its mask, every pixel of a defect image would count as normal: refused before any work,
    naming the image and the mask path looked for; the train split needs no masks."""
    root = make_tree(tmp_path / "my_part", defects=("dent", "scratch"), masks=False)
    _png(root / "ground_truth" / "dent" / "000_mask.png", _mask())
    with pytest.raises(DataError) as e:
        list_samples(f"folder:{root}", "test")
    msg = str(e.value)
    assert str(root / "test" / "scratch" / "000.png") in msg
    assert str(root / "ground_truth" / "scratch" / "000_mask.png") in msg and "missing_masks=image_only" in msg
    assert len(list_samples(f"folder:{root}", "train")) == 2


def test_folder_layout_image_only_keeps_unmasked_defects_out_of_pixel_ground_truth(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "my_part", defects=("dent", "scratch"), masks=False)
    _png(root / "ground_truth" / "dent" / "000_mask.png", _mask())
    test = list_samples(f"folder:{root}", "test", missing_masks="image_only")
    assert categories(test) == ["folder/my_part"]
    by_defect = {s.defect: s for s in test}
    assert set(by_defect) == {"good", "dent", "scratch"}
    assert by_defect["dent"].mask_path is not None and by_defect["dent"].has_mask
    assert by_defect["scratch"].label == 1 and by_defect["scratch"].mask_path is None
    assert not by_defect["scratch"].has_mask and by_defect["good"].has_mask
    ds = AnomalyDataset(test, image_size=16)
    i = test.index(by_defect["scratch"])
    assert ds[i]["has_mask"] is False
    with pytest.raises(ConfigError, match="missing_masks"):
        list_samples(f"folder:{root}", "test", missing_masks="ignore")


def test_unmasked_defects_count_in_image_metrics_only(tmp_path: Path) -> None:
    """The issue's case: one mask deleted. With image_only, pixel metrics are those of the images whose masks
    are known (checked with scikit-learn on those pixels), image metrics still use every image."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from vpdm.evaluation.evaluator import evaluate_maps

    root = make_tree(tmp_path / "part", defects=("crack", "dent", "hole"))
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    test = list_samples(f"folder:{root}", "test", missing_masks="image_only")
    ds = AnomalyDataset(test, image_size=16, mask_size=16)
    rng = np.random.default_rng(0)
    maps = rng.random((len(test), 16, 16)).astype(np.float32)
    for i, s in enumerate(test):
        if s.mask_path is not None:
            maps[i] += 0.5 * ds.mask_array(i)  # the known defects are found...
        elif s.label == 1:
            maps[i] += 0.5  # ...and the unmasked one lights up everywhere (all "normal" pixels if it counted)
    scores = maps.max(axis=(1, 2))
    result = evaluate_maps(scores, maps, ds)
    known = [i for i, s in enumerate(test) if s.has_mask]
    assert len(known) == len(test) - 1
    assert result.pixel_left_out == [str(root / "test" / "hole" / "000.png")]
    truth = np.stack([ds.mask_array(i) for i in known]).reshape(-1)
    flat = maps[known].reshape(-1)
    got = result.metrics["per_class"]["folder/part"]
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(truth, flat))
    assert got["pixel_ap"] == pytest.approx(average_precision_score(truth, flat))
    labels = [s.label for s in test]
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # every image, the unmasked one too


def _fake_visa(root: Path) -> Path:
    rows = []
    for obj in ("candle", "pcb1"):
        for i in range(2):
            p = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            Image.fromarray(_rgb(i)).save(_mk(root / p), format="JPEG")
            rows.append([obj, "train", "normal", p, ""])
        p = f"{obj}/Data/Images/Normal/0100.JPG"
        Image.fromarray(_rgb(5)).save(_mk(root / p), format="JPEG")
        rows.append([obj, "test", "normal", p, ""])
        p, m = f"{obj}/Data/Images/Anomaly/000.JPG", f"{obj}/Data/Masks/Anomaly/000.png"
        Image.fromarray(_rgb(6)).save(_mk(root / p), format="JPEG")
        vm = np.zeros((16, 16), np.uint8)
        vm[2:5, 2:5] = 1  # VisA-style 0/1 (label-id) mask
        _png(root / m, vm)
        rows.append([obj, "test", "anomaly", p, m])
    _mk(root / "split_csv" / "1cls.csv")
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_visa_layout(tmp_path: Path) -> None:
    root = _fake_visa(tmp_path / "VisA")
    train = list_samples(f"visa:{root}", "train")
    test = list_samples(f"visa:{root}", "test")
    assert categories(train) == ["visa/candle", "visa/pcb1"] and len(train) == 4
    assert len(test) == 4 and sum(s.label for s in test) == 2
    ds = AnomalyDataset(test, image_size=16)
    anomalous = [i for i, s in enumerate(test) if s.label == 1]
    assert all(float(ds[i]["mask"].sum()) == 9.0 for i in anomalous)  # 0/1 mask binarised with >0
    # a missing mask file and a bad header are reported
    (root / test[anomalous[0]].mask_path).unlink()  # type: ignore[operator]
    with pytest.raises(DataError, match=r"000\.JPG.*expected.*000\.png"):
        list_samples(f"visa:{root}", "test")
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\n")
    with pytest.raises(DataError, match=r"1cls\.csv.*label"):
        list_samples(f"visa:{root}", "train")


def test_visa_image_only_keeps_an_anomaly_without_mask_out_of_pixel_ground_truth(tmp_path: Path) -> None:
    root = _fake_visa(tmp_path / "VisA")
    test = list_samples(f"visa:{root}", "test")
    first = next(s for s in test if s.label == 1)
    first.mask_path.unlink()  # type: ignore[union-attr]
    with pytest.raises(DataError, match="missing_masks=image_only"):
        list_samples(f"visa:{root}", "test")
    kept = list_samples(f"visa:{root}", "test", missing_masks="image_only")
    assert [(s.image_path, s.label, s.has_mask) for s in kept if s.image_path == first.image_path] == [
        (first.image_path, 1, False)
    ]
    assert sum(not s.has_mask for s in kept) == 1 and len(kept) == len(test)


def test_visa_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split_csv.*1cls\.csv"):
        list_samples(f"visa:{tmp_path}", "train")


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_category_without_train_good(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data" / "bottle", n_train=0)
    with pytest.raises(DataError, match=str(root)):
        list_samples(f"mvtec:{tmp_path / 'data'}", "train")
    with pytest.raises(DataError, match="train/good"):
        list_samples(f"mvtec:{root}", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no category found in.*empty"):
        list_samples(f"mvtec:{tmp_path / 'empty'}", "train")


def test_missing_mask_names_image_and_expected_path(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "bottle", masks=False)
    with pytest.raises(DataError) as e:
        list_samples(f"mvtec:{root}", "test")
    msg = str(e.value)
    assert str(root / "test" / "crack" / "000.png") in msg
    assert str(root / "ground_truth" / "crack" / "000_mask.png") in msg
    assert len(list_samples(f"mvtec:{root}", "train")) == 2  # train split does not need masks


def test_mask_size_mismatch(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "bottle")
    _png(root / "ground_truth" / "crack" / "000_mask.png", _mask(size=12))
    with pytest.raises(DataError) as e:
        list_samples(f"mvtec:{root}", "test")
    msg = str(e.value)
    assert "000_mask.png" in msg and str(root / "test" / "crack" / "000.png") in msg
    assert "12x12" in msg and "16x16" in msg


def test_truncated_png_fails_with_name(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "bottle")
    bad = root / "train" / "good" / "001.png"
    _png(bad, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    train = list_samples(f"mvtec:{root}", "train")  # header is intact: listing stays cheap
    ds = AnomalyDataset(train, image_size=16)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DataError, match="001.png"):
        ds[1]
    with pytest.raises(DataError, match="001.png"):
        check_images(train)
    ds[0]  # the good one still loads


def test_non_image_file(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "bottle")
    (root / "train" / "good" / "001.png").write_text("not an image")
    train = list_samples(f"mvtec:{root}", "train")
    with pytest.raises(DataError, match=r"001\.png.*expected"):
        AnomalyDataset(train)[1]
    # a non-image mask fails already at listing (header check)
    (root / "ground_truth" / "crack" / "000_mask.png").write_text("nope")
    with pytest.raises(DataError, match="000_mask.png"):
        list_samples(f"mvtec:{root}", "test")


def test_rgba_palette_and_16bit_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, colour kept
    g16 = np.full((8, 8), 65535, np.uint16)
    g16[:4] = 0
    g16[4] = 32896  # mid-grey: must scale to 128, not clip to 255
    p_rgba = _png(tmp_path / "rgba.png", rgba)
    p16 = tmp_path / "g16.png"
    Image.fromarray(g16).save(p16)
    pal = Image.fromarray(_rgb(0, 8)).convert("P")
    p_pal = tmp_path / "pal.png"
    pal.save(p_pal)
    with Image.open(p16) as im:
        assert im.mode.startswith("I")
    samples = [Sample(p, None, 0, "t/x", "good") for p in (p_rgba, p16, p_pal)]
    ds = AnomalyDataset(samples, image_size=8, normalize=False)
    for i in range(3):
        assert ds[i]["image"].shape == (3, 8, 8)
    assert ds.raw_image(0)[0, 0].tolist() == [200, 0, 0]
    assert ds.raw_image(1)[0, 0].tolist() == [0, 0, 0] and ds.raw_image(1)[7, 0].tolist() == [255, 255, 255]
    assert ds.raw_image(1)[4, 0].tolist() == [128, 128, 128]


def test_dataset_argument_errors() -> None:
    with pytest.raises(DataError, match="no samples"):
        AnomalyDataset([])
    s = [Sample(Path("x.png"), None, 0, "t/x", "good")]
    with pytest.raises(ConfigError, match="image_size.*0"):
        AnomalyDataset(s, image_size=0)
    with pytest.raises(ConfigError, match="mask_size"):
        AnomalyDataset(s, mask_size=-1)


# ---------------------------------------------------------------------------------------------
# synthetic demo
# ---------------------------------------------------------------------------------------------

SMALL_DEMO = dict(classes=3, train_per_class=3, test_good_per_class=2, test_defect_per_class=4, size=48)


def test_demo_deterministic_and_idempotent(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=3, **SMALL_DEMO)  # type: ignore[arg-type]
    b = make_demo_dataset(tmp_path / "b", seed=3, **SMALL_DEMO)  # type: ignore[arg-type]
    c = make_demo_dataset(tmp_path / "c", seed=4, **SMALL_DEMO)  # type: ignore[arg-type]
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * (3 + 2 + 4 + 4)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    # normals vary within a class
    g = sorted((a / "grid" / "train" / "good").glob("*.png"))
    assert g[0].read_bytes() != g[1].read_bytes()
    # idempotent: second call rewrites nothing
    mtimes = {f: (a / f).stat().st_mtime_ns for f in files}
    make_demo_dataset(tmp_path / "a", seed=3, **SMALL_DEMO)  # type: ignore[arg-type]
    assert mtimes == {f: (a / f).stat().st_mtime_ns for f in files}
    with pytest.raises(DataError, match="other parameters"):
        make_demo_dataset(tmp_path / "a", seed=5, **SMALL_DEMO)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="classes"):
        make_demo_dataset(tmp_path / "d", classes=0)


def test_demo_loads_and_masks_match_labels(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", **SMALL_DEMO)  # type: ignore[arg-type]
    spec = f"demo:{root}"
    train, test = list_samples(spec, "train"), list_samples(spec, "test")
    assert categories(train) == ["demo/blobs", "demo/disc", "demo/grid"]
    assert len(train) == 9 and len(test) == 18 and sum(s.label for s in test) == 12
    ds = AnomalyDataset(test, image_size=48)
    for i, s in enumerate(test):
        m = ds.mask_array(i)
        assert (m.sum() > 0) == (s.label == 1), s.image_path
        if s.label == 1:  # defect is visible: pixels inside the mask differ from the class mean
            img = ds.raw_image(i).astype(float)
            assert np.abs(img[m > 0].mean(0) - img[m == 0].mean(0)).max() > 20
    check_images(test, progress=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))  # default collate works
    assert batch["image"].shape == (4, 3, 48, 48) and batch["class_index"].dtype == torch.int64


def test_demo_spec_generates_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPDM_DEMO_DIR", str(tmp_path / "cache"))
    assert demo_root() == tmp_path / "cache"
    train = list_samples("demo", "train")
    assert len(train) == 3 * 24 and (tmp_path / "cache" / ".vpdm_demo.json").is_file()


def test_small_defect_demo_has_few_pixel_defects_inside_the_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`demo-small`: small parts freely placed and fine textures, each defect a few pixels (under 0.2 % of
    the image, the bench's "small" stratum), drawn where the class's region is (on the screw, not beside it)."""
    from vpdm.data.demo import SMALL_DEFECTS, SMALL_DEMO_CLASSES

    monkeypatch.setenv("VPDM_DEMO_DIR", str(tmp_path / "demo"))
    root = make_demo_dataset(
        tmp_path / "small",
        classes=list(SMALL_DEMO_CLASSES),
        train_per_class=2,
        test_good_per_class=1,
        test_defect_per_class=6,
        size=128,
    )
    test = list_samples(f"demo-small:{root}", "test")
    assert categories(test) == [f"demo-small/{c}" for c in sorted(SMALL_DEMO_CLASSES)]
    assert {s.defect for s in test if s.label} == set(SMALL_DEFECTS)
    ds = AnomalyDataset(test, image_size=128)
    for i, s in enumerate(test):
        m = ds.mask_array(i)
        if s.label == 0:
            continue
        assert 1 <= m.sum() <= 0.002 * 128 * 128 * 4, (s.image_path, int(m.sum()))  # a few pixels (at 256: < 0.2 %)
        img = ds.raw_image(i).astype(float)
        ring = ndimage.binary_dilation(m > 0, iterations=2) & (m == 0)
        assert np.abs(img[m > 0].mean(0) - img[ring].mean(0)).max() > 10, s.image_path  # visible locally
    # screws lie anywhere at any angle: the part's centre moves between images
    screws = [s for s in list_samples(f"demo-small:{root}", "train") if s.category == "demo-small/screw"]
    centres = []
    for s in screws:
        grey = np.asarray(Image.open(s.image_path).convert("L"), dtype=float)
        ys, xs = np.nonzero(grey < 170)  # the part is darker than the plain background
        centres.append((ys.mean(), xs.mean()))
    assert np.hypot(*np.subtract(*centres)) > 2
    # the plain spec generates the small set beside the default demo
    assert demo_root("demo-small") == tmp_path / "demo-small"
    with pytest.raises(ConfigError, match="names"):
        make_demo_dataset(tmp_path / "bad", classes=["screw", "nope"])


def test_non_square_images_and_masks_are_squashed_alike(tmp_path: Path) -> None:
    """A 100 x 40 image (BSData is 256 x 104) and its mask are both resized to the square input size without
    keeping the aspect ratio (as anomalib's Resize), so a defect stays where the mask says."""
    cat = tmp_path / "part"
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "test" / "dent").mkdir(parents=True)
    (cat / "ground_truth" / "dent").mkdir(parents=True)
    img = np.full((40, 100, 3), 200, dtype=np.uint8)
    img[25:33, 70:86] = (20, 20, 20)  # the defect, near a corner
    mask = np.zeros((40, 100), dtype=np.uint8)
    mask[25:33, 70:86] = 255
    Image.fromarray(img).save(cat / "train" / "good" / "000.png")
    Image.fromarray(img).save(cat / "test" / "dent" / "000.png")
    Image.fromarray(mask).save(cat / "ground_truth" / "dent" / "000_mask.png")
    test = list_samples(f"folder:{cat}", "test")
    ds = AnomalyDataset(test, image_size=64, mask_size=64)
    m, raw = ds.mask_array(0), ds.raw_image(0)
    assert m.shape == (64, 64) and raw.shape == (64, 64, 3)
    ys, xs = np.nonzero(m)
    # nearest neighbour: output row j reads source row floor((j + 0.5) * 40 / 64), column floor((j + 0.5) * 100 / 64)
    assert (ys.min(), ys.max()) == (40, 52) and (xs.min(), xs.max()) == (45, 54)
    dark = raw.mean(axis=2) < 110
    assert (dark & (m > 0)).sum() / dark.sum() > 0.85 and (dark & (m > 0)).sum() / m.sum() > 0.85


def test_bsdata_counts_and_its_non_square_masks_line_up(shared_data: Path) -> None:
    root = shared_data / "bsdata" / "ball_screw_drive"
    if not root.is_dir():
        pytest.skip(f"BSData not found at {root}")
    train, test = list_samples(f"folder:{root}", "train"), list_samples(f"folder:{root}", "test")
    assert categories(test) == ["folder/ball_screw_drive"]
    assert len(train) == 390 and len(test) == 280 + 167 and sum(s.label for s in test) == 167
    pits = [s for s in test if s.label]
    with Image.open(pits[0].image_path) as im:
        assert im.size == (256, 104)
    ds = AnomalyDataset(pits[:20], image_size=224, mask_size=224)
    for i, s in enumerate(pits[:20]):
        with Image.open(s.mask_path) as mim:
            original = np.asarray(mim) > 127
        ys, xs = np.nonzero(original)
        m = ds.mask_array(i)
        assert m.shape == (224, 224) and m.any(), s.image_path
        ry, rx = np.nonzero(m)
        # the same place after squashing 256 x 104 to 224 x 224 (within 2.5 output pixels); one-pixel pits that
        # nearest neighbour would drop are kept
        assert (
            abs(ry.mean() - (ys.mean() + 0.5) * 224 / 104 + 0.5) < 2.5
            and abs(rx.mean() - (xs.mean() + 0.5) * 224 / 256 + 0.5) < 2.5
        )


def test_resize_mask_keeps_a_defect_thinner_than_the_resampling_step() -> None:
    from vpdm.data.images import resize_mask

    mask = np.zeros((10, 100), dtype=np.uint8)
    mask[4, 9] = 1  # column 9 of 100 is skipped by nearest neighbour at 64 columns (it reads 8 and 10)
    mask[2:8, 50:60] = 1  # a large region: plain nearest neighbour
    nearest = np.asarray(Image.fromarray(mask * 255).resize((64, 64), Image.Resampling.NEAREST)) > 127
    out = resize_mask(mask, 64)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    assert not nearest[:, :8].any() and out[:, :8].any()  # the pit would vanish; it is kept, where it was
    _, xs = np.nonzero(out[:, :8])
    assert set(xs.tolist()) <= {5, 6}  # column 9 of 100 covers output columns 5.76-6.4
    assert np.array_equal(out[:, 20:] > 0, nearest[:, 20:])  # elsewhere nearest neighbour, unchanged
