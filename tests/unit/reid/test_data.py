"""Synthetic set, Arrow storage, PK sampler, evaluation shards and the RGBNT201 importer."""

import os

import numpy as np
import pytest

from reid.data import DataError, PKSampler, eval_shard, fetch, load_splits, read_meta
from reid.rgbnt201 import import_rgbnt201
from reid.synth import SynthSpec, ensure_synth, num_records, records

SMALL = SynthSpec(seed=3, num_train_ids=12, num_test_ids=5, num_cameras=3, images_per_camera=3, height=64, width=32)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "small")
    assert ensure_synth(out, SMALL, progress=False)
    return out


def test_synth_is_reproducible_and_seed_dependent():
    a = [r["rgb"] for _, r in zip(range(5), records(SMALL, "train"))]
    b = [r["rgb"] for _, r in zip(range(5), records(SMALL, "train"))]
    other = SynthSpec(**{**SMALL.__dict__, "seed": 4})
    c = [r["rgb"] for _, r in zip(range(5), records(other, "train"))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))


def test_synth_layout_like_rgbnt201(small_set):
    s = load_splits(small_set)
    train, query, gallery = (np.asarray(s[k]["pid"]) for k in ("train", "query", "gallery"))
    assert len(np.unique(train)) == 12 and len(np.unique(query)) == 5
    assert set(train).isdisjoint(query) and set(query) == set(gallery)
    for k in ("train", "query", "gallery"):
        assert len(s[k]) == num_records(SMALL, k)
        assert set(np.asarray(s[k]["camid"])) == {0, 1, 2}
    b = fetch(s["train"], [0, 5])
    assert b.rgb.shape == (2, 3, 64, 32) and b.nir.shape == (2, 1, 64, 32) and b.tir.shape == (2, 1, 64, 32)
    assert b.rgb.min() >= -1 and b.rgb.max() <= 1
    # the same identity looks more alike than two identities (in raw pixels, person + clutter)
    assert read_meta(small_set)["spec"]["seed"] == 3


def test_synth_cache_is_reused_and_rebuilt_for_another_spec(small_set, tmp_path):
    assert not ensure_synth(small_set, SMALL, progress=False)  # same spec: cached
    out = str(tmp_path / "x")
    tiny = SynthSpec(num_train_ids=2, num_test_ids=1, num_cameras=2, images_per_camera=2, height=32, width=16)
    assert ensure_synth(out, tiny, progress=False)
    bigger = SynthSpec(**{**tiny.__dict__, "num_train_ids": 3})
    assert ensure_synth(out, bigger, progress=False)
    assert len(np.unique(np.asarray(load_splits(out)["train"]["pid"]))) == 3


def test_arrow_rows_equal_generated_records(small_set):
    s = load_splits(small_set)
    recs = list(records(SMALL, "query"))
    idx = [0, 7, 3]
    b = fetch(s["query"], idx)
    for j, i in enumerate(idx):
        back = np.round((b.rgb[j].numpy() + 1) * 127.5).astype(np.uint8)
        assert np.array_equal(back, recs[i]["rgb"])
        assert int(b.pid[j]) == recs[i]["pid"] and int(b.camid[j]) == recs[i]["camid"]


def test_synth_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="images_per_camera=1"):
        SynthSpec(images_per_camera=1)
    with pytest.raises(ValueError, match="num_cameras=1"):
        SynthSpec(num_cameras=1)


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DataError, match="msmoe data synth"):
        load_splits(str(tmp_path / "nothing"))


def test_pk_sampler_splits_identities_across_ranks_deterministically():
    pids = np.repeat(np.arange(20), 5)
    samplers = [PKSampler(pids, p=8, k=3, world_size=2, rank=r, seed=1) for r in range(2)]
    for step in (0, 1, 17):
        parts = [s.indices(step) for s in samplers]
        assert all(len(p) == 4 * 3 for p in parts)
        ids = [set(pids[p]) for p in parts]
        assert len(ids[0]) == 4 and len(ids[1]) == 4 and ids[0].isdisjoint(ids[1])
        whole = [i for group in samplers[0].global_batch(step) for i in group]
        assert parts[0] + parts[1] == whole  # rank slices tile the global batch in order
        for p in parts:  # K images of each identity
            _, counts = np.unique(pids[p], return_counts=True)
            assert set(counts) == {3}
    assert samplers[0].indices(5) == PKSampler(pids, 8, 3, 2, 0, seed=1).indices(5)
    assert samplers[0].indices(5) != PKSampler(pids, 8, 3, 2, 0, seed=2).indices(5)


def test_pk_sampler_errors():
    pids = np.repeat(np.arange(5), 2)
    with pytest.raises(DataError, match="5 identities but train.p=8"):
        PKSampler(pids, p=8, k=2, world_size=1, rank=0, seed=0)
    with pytest.raises(DataError, match="train.p=3 .* not divisible by the world size 2"):
        PKSampler(pids, p=3, k=2, world_size=2, rank=0, seed=0)
    s = PKSampler(pids, p=4, k=4, world_size=1, rank=0, seed=0)  # fewer than K images: with replacement
    assert len(s.indices(0)) == 16


@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (5, 4), (1, 2)])
def test_eval_shards_cover_every_row_once(n, world):
    shards = [eval_shard(n, world, r) for r in range(world)]
    assert len({len(i) for i, _ in shards}) == 1  # equal length on every rank
    rows = [i for idx, valid in shards for i, v in zip(idx, valid) if v]
    assert rows == list(range(n))


# ----------------------------------------------------------------- RGBNT201 importer
def _fake_rgbnt201(root, broken=()):
    from PIL import Image

    rng = np.random.default_rng(0)
    layout = {"train_171": [(1, 1), (1, 2), (2, 1), (2, 3)], "test": [(5, 1), (5, 2), (6, 3), (6, 1)]}
    for split, items in layout.items():
        for sub in ("RGB", "NI", "TI"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for n, (pid, cam) in enumerate(items):
            name = f"{pid:06d}_cam{cam}_0_{n:02d}.jpg"
            for sub, mode in (("RGB", "RGB"), ("NI", "L"), ("TI", "L")):
                shape = (40, 20, 3) if mode == "RGB" else (40, 20)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(os.path.join(root, split, sub, name))
    return root


def test_rgbnt201_import(tmp_path):
    src = _fake_rgbnt201(str(tmp_path / "RGBNT201"))
    rep = import_rgbnt201(src, str(tmp_path / "out"), height=32, width=16, progress=False)
    assert rep.records == {"train": 4, "test": 4} and rep.bad == []
    s = load_splits(str(tmp_path / "out"))
    assert sorted(np.asarray(s["train"]["pid"]).tolist()) == [1, 1, 2, 2]
    assert sorted(np.asarray(s["query"]["camid"]).tolist()) == [0, 0, 1, 2]  # cam1 -> 0
    b = fetch(s["gallery"], [0])
    assert b.rgb.shape == (1, 3, 32, 16) and b.tir.shape == (1, 1, 32, 16)


@pytest.mark.parametrize("damage,reason", [
    ("missing", "missing modality NI"),
    ("unreadable", "unreadable image"),
    ("size", "modalities differ in size"),
    ("name", "does not start with <person id>_cam<camera>"),
])
def test_rgbnt201_bad_records_error_or_skip(tmp_path, damage, reason):
    from PIL import Image

    src = _fake_rgbnt201(str(tmp_path / "RGBNT201"))
    name = "000002_cam3_0_03.jpg"
    bad_file = os.path.join(src, "train_171", "NI", name)
    if damage == "missing":
        os.remove(bad_file)
    elif damage == "unreadable":
        with open(bad_file, "wb") as fh:
            fh.write(b"not a jpeg")
    elif damage == "size":
        Image.fromarray(np.zeros((30, 20), np.uint8), "L").save(bad_file)
    else:
        for sub in ("RGB", "NI", "TI"):
            os.rename(os.path.join(src, "train_171", sub, name), os.path.join(src, "train_171", sub, "person_x.jpg"))
        name = "person_x.jpg"
    with pytest.raises(DataError, match=reason) as err:
        import_rgbnt201(src, str(tmp_path / "out"), 32, 16, progress=False)
    assert name in str(err.value) and "--skip-bad" in str(err.value)
    rep = import_rgbnt201(src, str(tmp_path / "out"), 32, 16, on_bad="skip", progress=False)
    assert rep.records["train"] == 3 and len(rep.bad) == 1 and reason.split()[0] in rep.bad[0]["reason"]
    assert read_meta(str(tmp_path / "out"))["skipped"] == 1
    assert len(load_splits(str(tmp_path / "out"))["train"]) == 3
