"""Data: sources, held-out splits, bad input, corrupt images, deterministic per-sample draws."""

import subprocess
import sys

import pytest
import torch

from mimaim.data import (DataError, GlobalBatchSampler, PretrainDataset, build_source, collate, pretrain_transform)
from mimaim.data.sources import load_digits_source, scan_image_folder


def test_digits_are_built_in_and_split_by_class():
    src = load_digits_source()
    assert len(src) == 1797 and src.has_labels and len(src.classes) == 10
    train, val = src.split("train", 0.2), src.split("val", 0.2)
    assert len(train) + len(val) == 1797
    assert set(val.labels) == set(range(10))
    img = src.load(0)
    assert img.size == (8, 8) and img.mode == "RGB"


def test_image_folder_labels_come_from_sub_folders(image_folder):
    src = scan_image_folder(image_folder)
    assert src.classes == ["a", "b"] and len(src) == 12
    val = src.split("val", 0.2)
    assert [src.items.index(p) for p in val.items] == [5, 11]  # the last image of each class is held out


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data imagefolder:PATH"):
        build_source(f"imagefolder:{tmp_path / 'nope'}")


def test_empty_folder_says_no_images(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images .* found under"):
        build_source(f"imagefolder:{tmp_path / 'empty'}")


def test_unknown_data_spec_lists_the_forms():
    with pytest.raises(DataError, match="unknown data spec 'cifar'.*digits.*imagefolder:PATH"):
        build_source("cifar")


@pytest.mark.parametrize("cache", ["on", "off"])
def test_a_corrupt_jpeg_is_skipped_with_a_warning(image_folder, cache, capsys):
    bad = image_folder / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    src = build_source(f"imagefolder:{image_folder}", cache=cache, max_bad_fraction=0.5, progress=False)
    ds = PretrainDataset(src, pretrain_transform(16), None, seed=0)
    batch = collate([ds[(0, i)] for i in range(len(src))])
    assert batch["image"].shape == (len(src), 3, 16, 16)
    if cache == "on":
        assert src.bad == [str(bad)] and str(bad) in capsys.readouterr().err
    else:
        assert batch["bad"] == [str(bad)]


def test_adjacent_broken_images_are_each_counted_once(image_folder):
    for i in range(3):  # three in a row: a retry lands on the next broken one
        (image_folder / "a" / f"0broken{i}.jpg").write_bytes(b"garbage")
    src = build_source(f"imagefolder:{image_folder}", cache="off", progress=False)
    ds = PretrainDataset(src, pretrain_transform(16), None, seed=0)
    bad = collate([ds[(0, i)] for i in range(len(src))])["bad"]
    assert sorted(bad) == [str(image_folder / "a" / f"0broken{i}.jpg") for i in range(3)]


def test_too_many_unreadable_images_stop_with_a_message(image_folder):
    for i in range(4):
        (image_folder / "a" / f"broken{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"4 of 16 images could not be read.*--max-bad-fraction"):
        build_source(f"imagefolder:{image_folder}", cache="on", max_bad_fraction=0.1, progress=False)


def test_cli_run_with_a_corrupt_image_counts_it_in_the_metrics(tmp_path, image_folder):
    (image_folder / "b" / "0broken.jpg").write_bytes(b"garbage")  # sorts into the training part of class b
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "mimaim", "pretrain", "--data", f"imagefolder:{image_folder}",
                             "--model", "vit_micro", "--img-size", "16", "--patch-size", "4", "--batch-size", "11",
                             "--epochs", "1", "--log-every", "1", "--cache", "off", "--max-bad-fraction", "0.5", "--no-progress",
                             "--set", "objective.decoder_depth=1", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipping unreadable image" in result.stderr and "0broken.jpg" in result.stderr
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "skipped_images"
    assert int(rows[-1].split(",")[-1]) == 1


def test_each_sample_is_the_same_whatever_the_batching(image_folder):
    src = build_source(f"imagefolder:{image_folder}", progress=False)
    ds = PretrainDataset(src, pretrain_transform(16), lambda g: torch.rand(4, generator=g), seed=3)
    a, b = ds[(2, 5)], ds[(2, 5)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masking"], b["masking"])
    assert not torch.equal(ds[(3, 5)]["image"], a["image"])  # another epoch, another crop


def test_global_batches_are_split_across_ranks_and_accumulation():
    one = list(GlobalBatchSampler(20, 8, accum_steps=1, seed=1, epoch=0))
    ranks = [list(GlobalBatchSampler(20, 8, accum_steps=2, rank=r, world_size=2, seed=1, epoch=0)) for r in range(2)]
    assert len(one) == 2 and all(len(b) == 8 for b in one)
    for step in range(2):  # the micro-batches of both ranks make up exactly the global batch
        parts = ranks[0][2 * step] + ranks[0][2 * step + 1] + ranks[1][2 * step] + ranks[1][2 * step + 1]
        assert parts == one[step]
    resumed = list(GlobalBatchSampler(20, 8, seed=1, epoch=0, start_step=1))
    assert resumed == one[1:]


def test_batch_size_that_does_not_split_is_rejected():
    with pytest.raises(ValueError, match="divisible by processes x accumulation"):
        GlobalBatchSampler(100, 10, accum_steps=3)


def test_steps_per_epoch_drops_the_last_partial_batch_and_checks_the_shape():
    from mimaim.data import steps_per_epoch

    assert steps_per_epoch(20, 8, 2, 2) == 2 and steps_per_epoch(16, 8) == 2
    with pytest.raises(ValueError, match="divisible by processes x accumulation"):
        steps_per_epoch(100, 10, 3)
    with pytest.raises(ValueError, match="larger than the 5 training images"):
        steps_per_epoch(5, 8)


def test_epoch_loader_covers_each_sample_once_across_ranks_and_resumes_on_the_next_batch(image_folder):
    from mimaim.data import make_epoch_loader

    src = build_source(f"imagefolder:{image_folder}", progress=False)  # 12 images
    src.labels = list(range(len(src)))  # the label identifies the sample
    kw = dict(seed=1, epoch=2, batch_size=4, accum_steps=2, world_size=2, num_workers=0)
    mask = lambda g: torch.rand(3, generator=g)  # noqa: E731
    ranks = [list(make_epoch_loader(src, pretrain_transform(8), mask, start_step=0, rank=r, **kw)) for r in range(2)]
    assert all(len(r) == 3 * 2 for r in ranks)  # 3 steps x 2 micro-batches of 1 image
    seen = [int(i) for r in ranks for b in r for i in b["label"]]
    assert sorted(seen) == list(range(12)) and set(ranks[0][0]) >= {"image", "masking", "bad"}
    resumed = list(make_epoch_loader(src, pretrain_transform(8), mask, start_step=1, rank=1, **kw))
    assert len(resumed) == 4
    for a, b in zip(resumed, ranks[1][2:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["masking"], b["masking"])


def test_training_subset_keeps_a_nested_share_of_every_class():
    from mimaim.data import training_subset

    train = load_digits_source().split("train", 0.1)
    small, big = training_subset(train, 0.25, 0), training_subset(train, 0.5, 0)
    assert set(small.labels) == set(range(10)) and set(small.items[0].shape) <= {8, 3}
    assert {id(x) for x in small.items} <= {id(x) for x in big.items}
    assert training_subset(train, 1.0, 0) is train
