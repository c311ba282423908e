"""WebDataset shards: exactly-once epochs over processes x workers, exact mid-epoch resume, order from
(seed, epoch), corrupt samples skipped and reported, `mimaim shards` round trip, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mimaim.data import DataError, Source, build_source, make_epoch_loader, pretrain_transform
from mimaim.data.shards import write_shards



def tiny_source(n: int, broken: Path | None = None) -> Source:
    """``n`` random 8x8 images whose label is their own index (so a batch names its samples)."""
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    if broken is not None:  # copied byte for byte into the shard, fails to decode when read
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        items[5] = str(broken)
    return Source("tiny", items, list(range(n)), [str(i) for i in range(n)])


@pytest.fixture
def shards(tmp_path):
    write_shards(tiny_source(40), tmp_path / "shards", shard_size=7, progress=False)  # 6 shards: 5 x 7 + 5
    return build_source(f"wds:{tmp_path / 'shards'}/train-{{000000..000005}}.tar")


def epoch(source, rank=0, world_size=2, num_workers=0, seed=1, epoch=0, start_step=0, batch_size=8, accum_steps=2):
    return list(make_epoch_loader(source, pretrain_transform(8), lambda g: torch.rand(5, generator=g), seed=seed,
                                  epoch=epoch, start_step=start_step, batch_size=batch_size, accum_steps=accum_steps,
                                  rank=rank, world_size=world_size, num_workers=num_workers, pin_memory=False))


def ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["label"]]


def test_two_processes_with_two_workers_read_every_sample_exactly_once(shards):
    assert len(shards) == 40 and len(shards.shards) == 6
    ranks = [epoch(shards, rank=r, num_workers=2) for r in range(2)]
    assert [len(r) for r in ranks] == [10, 10]  # 5 steps x 2 micro-batches of 2 images on each process
    assert all(b["image"].shape == (2, 3, 8, 8) and b["masking"].shape == (2, 5) for r in ranks for b in r)
    assert sorted(ids(ranks[0]) + ids(ranks[1])) == list(range(40))
    # a batch that does not divide the data drops the same remainder on every process (as for folders)
    ranks = [epoch(shards, rank=r, batch_size=12, accum_steps=1) for r in range(2)]
    seen = ids(ranks[0]) + ids(ranks[1])
    assert len(seen) == len(set(seen)) == 36


def test_the_batches_do_not_depend_on_the_number_of_workers(shards):
    reference = epoch(shards, num_workers=0)
    for workers in (1, 2):
        other = epoch(shards, num_workers=workers)
        assert ids(other) == ids(reference)
        assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["masking"], b["masking"])
                   for a, b in zip(reference, other))


def test_resuming_mid_epoch_continues_on_the_very_next_sample(shards):
    for rank in range(2):
        full = epoch(shards, rank=rank)
        resumed = epoch(shards, rank=rank, start_step=3, num_workers=2)
        assert len(resumed) == len(full) - 3 * 2
        for a, b in zip(resumed, full[6:]):
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
            assert torch.equal(a["masking"], b["masking"])


def test_the_order_is_a_function_of_seed_and_epoch(shards):
    base = ids(epoch(shards, world_size=1, batch_size=8, accum_steps=1))
    assert ids(epoch(shards, world_size=1, batch_size=8, accum_steps=1)) == base
    other_epoch = ids(epoch(shards, world_size=1, batch_size=8, accum_steps=1, epoch=1))
    other_seed = ids(epoch(shards, world_size=1, batch_size=8, accum_steps=1, seed=2))
    assert sorted(other_epoch) == sorted(other_seed) == sorted(base) == list(range(40))
    assert other_epoch != base and other_seed != base and other_epoch != other_seed


def test_a_corrupt_sample_is_replaced_and_reported(tmp_path):
    write_shards(tiny_source(16, broken=tmp_path / "broken.png"), tmp_path / "shards", shard_size=5, progress=False)
    source = build_source(f"wds:{tmp_path / 'shards'}")
    batches = epoch(source, world_size=1, batch_size=4, accum_steps=1, num_workers=0)
    bad = [path for b in batches for path in b["bad"]]
    assert len(bad) == 1 and bad[0].startswith(str(tmp_path / "shards" / "train-00000"))
    assert all(b["image"].shape[0] == 4 for b in batches) and len(batches) == 4
    seen = ids(batches)
    assert 5 not in seen and len(seen) == 16  # its place went to another sample of the same shard
    with pytest.raises(Exception, match="cannot identify image"):
        source.load(source.labels.index(5))


def test_shards_command_round_trip_keeps_images_and_classes(tmp_path, image_folder, capsys):
    from mimaim.cli import main

    out = tmp_path / "out"
    assert main(["shards", f"imagefolder:{image_folder}", str(out), "--shard-size", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 12 images (2 classes) into 3 shard(s)" in printed
    assert f"--data 'wds:{out}/train-{{000000..000002}}.tar'" in printed
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [5, 5, 2]
    folder = build_source(f"imagefolder:{image_folder}", cache="off")
    source = build_source(f"wds:{out}/train-{{000000..000002}}.tar")
    assert source.classes == folder.classes == ["a", "b"] and source.has_labels and len(source) == 12
    by_path = {p: i for i, p in enumerate(folder.items)}
    for i in range(len(source)):
        shard, pos = source.locate(source.items[i])
        path = json.loads(_member(source.shards[shard], index["shards"][shard]["keys"][pos] + ".json"))["path"]
        assert source.labels[i] == folder.labels[by_path[path]]
        assert np.array_equal(np.asarray(source.load(i)), np.asarray(folder.load(by_path[path])))
    train, val = source.split("train", 0.2), source.split("val", 0.2)
    assert len(train) + len(val) == 12 and sorted(val.labels) == [0, 1]
    assert sorted(train.items + val.items) == list(range(12))


def _member(tar_path: str, name: str) -> bytes:
    import tarfile

    with tarfile.open(tar_path) as tar:
        return tar.extractfile(name).read()


def test_missing_index_and_unknown_shards_say_what_to_do(tmp_path, shards):
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no index.json .* `mimaim shards imagefolder:PATH OUT`"):
        build_source(f"wds:{tmp_path / 'bare'}")
    with pytest.raises(DataError, match="not listed in .*index.json.*check the brace pattern"):
        build_source(f"wds:{tmp_path / 'shards'}/train-{{000000..000009}}.tar")
    with pytest.raises(DataError, match="already exists; write the shards to a new folder"):
        write_shards(tiny_source(3), tmp_path / "shards", progress=False)


@pytest.mark.parametrize("fmt", ["pax", "gnu", "gz"])
def test_the_local_tar_reader_groups_samples_as_webdataset_does(tmp_path, fmt):
    import gzip
    import io
    import tarfile

    from webdataset.tariterators import tarfile_samples

    from mimaim.data.shards import shard_samples

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT if fmt == "gnu" else tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("README"))  # a file without a field: not a sample
        for key in ["a" * 120 + "/x0", "sub/x1", "x2"]:
            for field, payload in (("jpg", b"\xff\xd8" + key.encode()), ("cls", b"3"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    data = gzip.compress(buf.getvalue()) if fmt == "gz" else buf.getvalue()
    path = tmp_path / ("s.tar.gz" if fmt == "gz" else "s.tar")
    path.write_bytes(data)
    ours, theirs = list(shard_samples(str(path))), list(tarfile_samples([{"url": str(path)}]))
    assert len(ours) == 3 and ours == theirs
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"x" * 1024)
    with pytest.raises(ValueError, match="not a valid tar file"):
        list(shard_samples(str(bad)))


def test_pretraining_on_shards_resumed_mid_epoch_matches_an_uninterrupted_run(tmp_path, image_folder):
    from safetensors.torch import load_file

    from mimaim.config import make_config
    from mimaim.engine.checkpoint import latest_checkpoint
    from mimaim.engine.trainer import pretrain

    write_shards(build_source(f"imagefolder:{image_folder}", cache="off"), tmp_path / "shards", shard_size=3,
                 progress=False)
    tiny = dict(model="vit_micro", img_size=16, patch_size=4, batch_size=4, epochs=2, warmup_epochs=1,
                objective_options={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
                num_workers=0, progress=False, log_every=1, val_fraction=0.2, data=f"wds:{tmp_path / 'shards'}")
    full = pretrain(make_config({**tiny, "out": str(tmp_path / "full")}))
    part = make_config({**tiny, "out": str(tmp_path / "part"), "max_steps": 3})  # stops inside epoch 2
    pretrain(part)
    part.max_steps = None
    resumed = pretrain(part, resume=True)
    a, b = (load_file(str(latest_checkpoint(run) / "model.safetensors")) for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_split_and_a_data_fraction_of_shards_stream_exactly_their_samples(shards):
    import dataclasses

    from mimaim.data import training_subset

    sample_of = dict(zip(shards.items, shards.labels))  # global id -> the `cls` stored in the tar
    two_classes = dataclasses.replace(shards, labels=[label % 2 for label in shards.labels], classes=["even", "odd"])
    train, val = two_classes.split("train", 0.25), two_classes.split("val", 0.25)
    assert (len(train), len(val)) == (30, 10) and sorted(val.labels) == [0] * 5 + [1] * 5
    part = training_subset(train, 0.5, seed=0)
    assert len(part) == 16 and set(part.items) < set(train.items)  # round(7.5) = 8 of each class
    for source, batch_size in ((val, 5), (part, 8)):
        batches = epoch(source, world_size=1, batch_size=batch_size, accum_steps=1, num_workers=2)
        assert sorted(ids(batches)) == sorted(sample_of[i] for i in source.items)


def half_broken_shards(tmp_path) -> str:
    """40 images in 6 shards, every odd one a file that fails to decode."""
    source = tiny_source(40)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    source.items = [str(tmp_path / "broken.png") if i % 2 else item for i, item in enumerate(source.items)]
    write_shards(source, tmp_path / "shards", shard_size=7, progress=False)
    return f"wds:{tmp_path / 'shards'}"


def test_half_broken_shards_count_each_broken_image_once(tmp_path):
    from mimaim.config import make_config
    from mimaim.engine.trainer import pretrain

    data = half_broken_shards(tmp_path)
    batches = epoch(build_source(data), world_size=1, batch_size=8, accum_steps=1)
    bad = [path for b in batches for path in b["bad"]]
    assert len(bad) == len(set(bad)) == 20  # each broken image once, in its own place, not again as a retry
    cfg = make_config(dict(model="vit_micro", img_size=16, patch_size=4, batch_size=8, epochs=1, num_workers=0,
                           objective_options={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
                           progress=False, data=data, out=str(tmp_path / "run")))
    with pytest.raises(DataError, match=r"^20 of 40 images could not be read \(50\.0% > the allowed 1\.0%\)"):
        pretrain(cfg)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_shard_ends_in_one_error_naming_it(tmp_path, shards, damage, workers):
    tar = tmp_path / "shards" / "train-000002.tar"
    tar.write_bytes(b"x" * 3000 if damage == "garbage" else tar.read_bytes()[:2000])
    with pytest.raises(DataError) as err:
        epoch(shards, world_size=1, batch_size=8, accum_steps=1, num_workers=workers)
    message = str(err.value)
    assert message.startswith(f"cannot read shard {tar}: not a valid tar file") and "rewrite it" in message
    assert "Traceback" not in message and "worker" not in message


TINY_CLI = ["--model", "vit_micro", "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--max-steps", "2",
            "--set", "objective.decoder_depth=1", "--set", "objective.decoder_embed_dim=32",
            "--set", "objective.decoder_num_heads=2", "--no-progress", "--num-workers", "0"]


def shardwriter_set(folder: Path, labelled: bool, n: int = 24) -> list[int]:
    """``n`` 16x16 images of 2 classes in 3 shards written by ``webdataset.ShardWriter``: jpg, png, jpeg (PIL
    images it encodes) and webp (bytes); ``cls`` an int or the text "1" -> the labels in write order."""
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(1)
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=n // 3, verbose=0) as sink:
        for i in range(n):
            label = i % 2
            img = Image.fromarray((40 + 150 * label + rng.integers(0, 60, (16, 16, 3))).astype(np.uint8))
            field = ("jpg", "png", "webp", "jpeg")[i % 4]
            if field == "webp":
                buf = io.BytesIO()
                img.save(buf, format="WEBP")
                img = buf.getvalue()
            sample = {"__key__": f"s{i:05d}", field: img}
            if labelled:
                sample["cls"] = str(label) if i % 3 else label
            sink.write(sample)
    return [i % 2 for i in range(n)] if labelled else [-1] * n


def test_shardwriter_shards_are_indexed_and_train_and_probe(tmp_path, capsys):
    from mimaim.cli import main

    labels = shardwriter_set(tmp_path / "shards", labelled=True)
    pattern = f"{tmp_path / 'shards'}/part-{{000000..000002}}.tar"
    assert main(["shards", "index", pattern, "--no-progress"]) == 0
    assert "indexed 24 samples in 3 shard(s), labels from `cls` (2 classes)" in capsys.readouterr().out
    source = build_source(f"wds:{pattern}")
    assert source.labels == labels and source.classes == ["0", "1"] and source.has_labels
    assert main(["shards", "index", pattern]) == 2  # an index is not overwritten
    assert "already exists; delete it" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"wds:{pattern}", *TINY_CLI, "--out", str(run)]) == 0
    assert main(["probe", str(run), "--probes", "knn", "--no-random-init", "--no-progress"]) == 0
    rows = json.loads((run / "probe.json").read_text())
    assert (rows[0]["train_images"], rows[0]["val_images"]) == (20, 4)


def test_label_less_shardwriter_shards_are_indexed_on_first_read(tmp_path, capsys, monkeypatch):
    from mimaim.cli import main
    from mimaim.data import shards as shards_module

    shardwriter_set(tmp_path / "shards", labelled=False)
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")

    def read_only(path, index):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shards_module, "write_index", read_only)
    source = build_source(f"wds:{tmp_path / 'shards'}", progress=False)
    assert len(source) == 24 and len(source.shards) == 3 and not source.has_labels
    assert "kept the index in memory" in capsys.readouterr().err
    assert not (tmp_path / "shards" / "index.json").exists()
    monkeypatch.undo()
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"wds:{tmp_path / 'shards'}", *TINY_CLI, "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert ("no index.json beside the shards: scanned 24 samples in 3 shard(s), 24 without an integer `cls` "
            "(pre-training only: probes need labels)") in err
    assert f"wrote {tmp_path / 'shards' / 'index.json'}" in err
    assert main(["probe", str(run), "--probes", "knn", "--no-progress"]) == 2
    assert "has no labels" in capsys.readouterr().err


def test_an_unreadable_shard_stops_training_and_indexing_with_one_line(tmp_path, capsys):
    from mimaim.cli import main

    shardwriter_set(tmp_path / "shards", labelled=True)
    assert main(["shards", "index", str(tmp_path / "shards"), "--no-progress"]) == 0
    bad = tmp_path / "shards" / "part-000001.tar"
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated after indexing: found while training
    assert main(["pretrain", "--data", f"wds:{tmp_path / 'shards'}", *TINY_CLI, "--max-steps", "5",  # an epoch
                 "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "shards" / "index.json").unlink()
    assert main(["shards", "index", str(tmp_path / "shards"), "--no-progress"]) == 2  # found while indexing
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mimaim: error")]
    assert errors == [f"mimaim: error: cannot read shard {bad}: not a valid tar file (unexpected end of data); "
                      "re-download or rewrite it, or leave it out of the --data pattern"] * 2
