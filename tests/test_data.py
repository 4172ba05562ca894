"""trainables.data: every on-disk format is written here in tmp_path and read back through build_data."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from trainables.data import DataConfig, DataError, InMemoryImages, build_data, dataset_names, loader
from trainables.data.folders import CROP, IMAGENET_MEAN, RESIZE

N_TRAIN, N_TEST = 50, 20
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ---------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fmnist_arrays(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image i has pixel (r, c) = (i + offset + 3r + 7c) mod 256, so pixel (0, 0) identifies it."""
    i = np.arange(n)[:, None, None] + offset
    r = np.arange(28)[None, :, None]
    c = np.arange(28)[None, None, :]
    images = ((i + 3 * r + 7 * c) % 256).astype(np.uint8)
    labels = ((np.arange(n) + offset) % 10).astype(np.uint8)
    return images, labels


def write_fmnist(root: Path, gz: bool = False) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, offset in (("train", N_TRAIN, 0), ("test", N_TEST, 100)):
        images, labels = fmnist_arrays(n, offset)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        for name, array in zip(IDX_NAMES[split], (images, labels)):
            data = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return arrays


def file_ids(dataset, mean: float) -> list[int]:
    """Which training-file image each item is, read back from its pixel (0, 0)."""
    return [round((float(dataset[i][0][0, 0, 0]) + mean) * 255) for i in range(len(dataset))]


def fm(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="fashion_mnist", root=str(root), **kw)


@pytest.fixture
def fm_root(tmp_path: Path) -> Path:
    write_fmnist(tmp_path / "fm")
    return tmp_path / "fm"


# ---------------------------------------------------------------- Fashion-MNIST / IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_values_labels_and_mean(tmp_path: Path, gz: bool) -> None:
    arrays = write_fmnist(tmp_path, gz=gz)
    bundle = build_data(fm(tmp_path, val_size=0, eval_on="test"), seed=0)
    images, labels = arrays["train_images"], arrays["train_labels"]

    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert bundle.mean == pytest.approx((images.mean() / 255,), abs=1e-9)
    assert len(bundle.train_eval) == N_TRAIN and len(bundle.val) == N_TEST
    assert bundle.dense_val is None
    # With nothing held out, the training part is the files in file order.
    x, y = bundle.train_eval[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == () and int(y) == labels[7]
    assert float(x[0, 5, 11]) == pytest.approx(images[7, 5, 11] / 255 - bundle.mean[0], abs=1e-6)
    torch.testing.assert_close(x[0], torch.from_numpy(images[7] / 255 - bundle.mean[0]).float())
    # The test split is normalised with the *training* mean.
    xt, yt = bundle.val[3]
    assert int(yt) == arrays["test_labels"][3]
    assert float(xt[0, 2, 9]) == pytest.approx(arrays["test_images"][3, 2, 9] / 255 - bundle.mean[0], abs=1e-6)


def test_split_sizes(fm_root: Path) -> None:
    b = build_data(fm(fm_root, val_size=0.2), 0)
    assert (len(b.train), len(b.val)) == (40, 10)
    b = build_data(fm(fm_root, val_size=7), 0)
    assert (len(b.train), len(b.val), len(b.train_eval)) == (43, 7, 43)
    b = build_data(fm(fm_root, subset=30, val_size=0.1), 0)
    assert (len(b.train), len(b.val)) == (27, 3)
    assert len(build_data(fm(fm_root, subset=30, eval_on="test"), 0).val) == N_TEST


def test_split_is_a_seeded_partition(fm_root: Path) -> None:
    def split(seed: int, **kw):
        b = build_data(fm(fm_root, val_size=10, **kw), seed)
        return file_ids(b.train_eval, b.mean[0]), file_ids(b.val, b.mean[0])

    train0, val0 = split(0)
    assert sorted(train0 + val0) == list(range(N_TRAIN))
    assert (train0, val0) == split(0)
    assert set(val0) != set(split(1)[1])
    # The mean is that of the training part only.
    b = build_data(fm(fm_root, val_size=10), 0)
    images, _ = fmnist_arrays(N_TRAIN)
    assert b.mean[0] == pytest.approx(images[train0].mean() / 255, abs=1e-9)
    # subset draws from the same permutation: a subset of 30 is the first 30 of it.
    sub_train, sub_val = split(0, subset=30)
    assert len(sub_train) + len(sub_val) == 30 and set(sub_val) <= set(val0)


def test_labeled_fraction_is_exact_and_stratified(fm_root: Path) -> None:
    b = build_data(fm(fm_root, val_size=10, labeled_fraction=0.3), seed=3)
    true = torch.stack([y for _, y in b.train_eval])
    semi = torch.stack([y for _, y in b.train])
    ids = file_ids(b.train_eval, b.mean[0])
    assert torch.equal(true, torch.tensor(ids) % 10)  # train_eval keeps every true label
    assert int((semi == -1).sum()) == 40 - 12  # round(0.3 * 40) labeled
    labeled = semi != -1
    assert torch.equal(semi[labeled], true[labeled])
    for cls in range(10):
        in_class = true == cls
        assert abs(int((labeled & in_class).sum()) - 0.3 * int(in_class.sum())) < 1
    again = build_data(fm(fm_root, val_size=10, labeled_fraction=0.3), seed=3)
    assert torch.equal(semi, torch.stack([y for _, y in again.train]))
    assert all(int(y) >= 0 for _, y in b.val)


def test_augment_is_crop_and_flip_of_the_clean_image(fm_root: Path) -> None:
    b = build_data(fm(fm_root, val_size=0, eval_on="test", augment=True), 0)
    plain = build_data(fm(fm_root, val_size=0, eval_on="test"), 0)
    assert b.train_eval.augment is False
    torch.manual_seed(0)
    changed = 0
    for i in range(10):
        x, _ = b.train[i]
        clean_raw = torch.from_numpy(fmnist_arrays(N_TRAIN)[0][i]).float()
        padded = torch.nn.functional.pad(clean_raw, (4, 4, 4, 4))  # black padding, then normalised
        candidates = [
            crop.flip(-1) if flip else crop
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            for crop in [padded[top : top + 28, left : left + 28] / 255 - b.mean[0]]
        ]
        assert any(torch.allclose(x[0], c, atol=1e-6) for c in candidates)
        changed += not torch.allclose(x, plain.train[i][0])
    assert changed > 0


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_fmnist(tmp_path, gz=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(bad.read_bytes()))
    data[0:4] = b"\x08\x01\x00\x00"
    bad.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="magic") as err:
        build_data(fm(tmp_path), 0)
    assert str(bad) in str(err.value)


def test_wrong_size_is_reported(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="size mismatch") as err:
        build_data(fm(tmp_path), 0)
    assert str(path) in str(err.value)


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_data(fm(missing), 0)
    assert str(missing) in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)


def test_unknown_dataset_and_bad_sizes(fm_root: Path) -> None:
    assert dataset_names() == ["cifar10", "cifar100", "fashion_mnist", "imagefolder"]
    with pytest.raises(DataError, match="cifar10, cifar100, fashion_mnist, imagefolder"):
        build_data(DataConfig(dataset="mnist"), 0)
    with pytest.raises(DataError, match="subset=5"):
        build_data(fm(fm_root, subset=5, val_size=5), 0)
    with pytest.raises(DataError, match="larger than"):
        build_data(fm(fm_root, subset=N_TRAIN + 1), 0)
    with pytest.raises(DataError, match="empty validation"):
        build_data(fm(fm_root, val_size=0), 0)
    for bad in (dict(val_size=1.0), dict(val_size=-1), dict(labeled_fraction=1.5), dict(subset=0), dict(eval_on="train")):
        with pytest.raises(DataError):
            DataConfig(**bad)


def test_identity(fm_root: Path, tmp_path: Path) -> None:
    def ident(root: Path = fm_root, seed: int = 0, **kw) -> str:
        return build_data(fm(root, **kw), seed).identity

    base = ident()
    assert base == ident() and base.startswith("fashion_mnist-")
    variants = [
        ident(seed=1),
        ident(subset=40),
        ident(val_size=0.2),
        ident(labeled_fraction=0.5),
        ident(augment=True),
        ident(eval_on="test"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    # The same files elsewhere give the same identity; a changed file does not.
    copy = tmp_path / "copy"
    shutil.copytree(fm_root, copy)
    assert ident(copy) == base
    labels = copy / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    labels.write_bytes(bytes(data))
    assert ident(copy) != base


# ---------------------------------------------------------------- CIFAR pickles


def write_cifar_batch(path: Path, data: np.ndarray, labels_key, labels: list[int], bytes_keys: bool) -> None:
    names = [f"{i}.png" for i in range(len(data))]
    entry = {"batch_label": "test", labels_key: labels, "data": data, "filenames": names}
    if bytes_keys:
        entry = {k.encode(): v for k, v in entry.items()}
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)


def cifar_data(rng: np.random.Generator, n: int) -> np.ndarray:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, :1024] //= 4  # distinct channel means, so a channel mix-up shows
    return data


def test_cifar10_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_data(rng, 4) for _ in range(5)]
    for k, data in enumerate(batches, start=1):
        labels = [(k + i) % 10 for i in range(4)]
        write_cifar_batch(folder / f"data_batch_{k}", data, "labels", labels, bytes_keys=True)
    write_cifar_batch(folder / "test_batch", cifar_data(rng, 6), "labels", [1] * 6, bytes_keys=True)
    batches[1][2, :] = 0
    batches[1][2, 1024 + 5 * 32 + 7] = 200  # green, row 5, column 7 of image 2 in batch 2
    write_cifar_batch(folder / "data_batch_2", batches[1], "labels", [(2 + i) % 10 for i in range(4)], bytes_keys=True)

    b = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=0, eval_on="test"), 0)
    assert (b.num_classes, b.in_channels, b.image_size, len(b.train_eval), len(b.val)) == (10, 3, 32, 20, 6)
    everything = np.concatenate(batches).reshape(-1, 3, 32, 32)
    assert b.mean == pytest.approx(tuple(everything.mean(axis=(0, 2, 3)) / 255), abs=1e-9)
    assert b.mean[0] < 0.2 < b.mean[1]
    x, y = b.train_eval[4 + 2]
    assert x.shape == (3, 32, 32) and int(y) == 4
    assert float(x[1, 5, 7]) == pytest.approx(200 / 255 - b.mean[1], abs=1e-6)
    assert float(x[1, 7, 5]) == pytest.approx(-b.mean[1], abs=1e-6)
    assert float(x[0, 5, 7]) == pytest.approx(-b.mean[0], abs=1e-6)
    assert float(x[2, 5, 7]) == pytest.approx(-b.mean[2], abs=1e-6)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 12), ("test", 5)):
        entry_labels = [99 - i for i in range(n)]
        write_cifar_batch(folder / name, cifar_data(rng, n), "fine_labels", entry_labels, bytes_keys=False)
        with (folder / name).open("rb") as f:
            entry = pickle.load(f)
        entry["coarse_labels"] = [i % 20 for i in range(n)]
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f, protocol=2)
    b = build_data(DataConfig(dataset="cifar100", root=str(tmp_path), val_size=0, eval_on="test"), 0)
    assert b.num_classes == 100
    assert [int(y) for _, y in b.train_eval] == [99 - i for i in range(12)]
    assert [int(y) for _, y in b.val] == [99 - i for i in range(5)]


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), 0)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)


# ---------------------------------------------------------------- image folders

COLOURS = {"cat": (200, 30, 90), "dog": (10, 250, 120)}


def write_folders(root: Path) -> None:
    for split, sizes in (("train", [(300, 260), (260, 300), (320, 280)]), ("val", [(300, 260)])):
        for cls, colour in COLOURS.items():
            (root / split / cls).mkdir(parents=True)
            for k, size in enumerate(sizes):
                Image.new("RGB", size, colour).save(root / split / cls / f"{k}.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder(tmp_path: Path) -> None:
    write_folders(tmp_path)
    b = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path)), 0)
    assert (b.num_classes, b.in_channels, b.image_size, b.mean) == (2, 3, CROP, IMAGENET_MEAN)
    assert (len(b.train), len(b.val), len(b.dense_val)) == (6, 2, 2)
    x, y = b.train[0]
    assert x.shape == (3, CROP, CROP) and int(y) == 0  # classes are the sorted folder names
    expected = torch.tensor([c / 255 - m for c, m in zip(COLOURS["cat"], IMAGENET_MEAN)])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    xv, yv = b.val[1]
    assert xv.shape == (3, CROP, CROP) and int(yv) == 1
    xd, _ = b.dense_val[0]  # 300 x 260 image: the shorter side becomes 256, the other keeps the aspect
    assert xd.shape == (3, RESIZE, round(300 * RESIZE / 260))
    with pytest.raises(ValueError, match="batch_size=1"):
        loader(b.dense_val, 2, False, 0)
    assert next(iter(loader(b.dense_val, 1, False, 0)))[0].shape == (1, 3, RESIZE, 295)

    sub = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), subset=4, labeled_fraction=0.5), 0)
    assert len(sub.train) == 4 and sum(int(y) == -1 for _, y in sub.train) == 2
    assert sub.identity != b.identity
    with pytest.raises(DataError, match="test"):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), eval_on="test"), 0)


# ---------------------------------------------------------------- loader


def test_loader_matches_dataset_and_covers_each_index_once(fm_root: Path) -> None:
    ds = build_data(fm(fm_root, val_size=0, eval_on="test"), 0).train_eval
    items = [ds[i] for i in range(len(ds))]
    ids = file_ids(ds, float(ds.mean[0]))
    dl = loader(ds, 8, shuffle=True, seed=5)
    orders = []
    for _ in range(2):
        seen = []
        for xb, yb in dl:
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64
            for x, y in zip(xb, yb):
                i = ids.index(round((float(x[0, 0, 0]) + float(ds.mean[0])) * 255))
                assert torch.equal(x, items[i][0]) and torch.equal(y, items[i][1])
                seen.append(i)
        assert sorted(seen) == list(range(len(ds)))
        orders.append(seen)
    assert orders[0] != orders[1]
    again = [i for xb, _ in loader(ds, 8, shuffle=True, seed=5) for i in xb[:, 0, 0, 0].tolist()]
    assert again == [items[i][0][0, 0, 0].item() for i in orders[0]]
    unshuffled = torch.cat([yb for _, yb in loader(ds, 8, shuffle=False, seed=0)])
    assert torch.equal(unshuffled, ds.labels)
    assert len(loader(ds, 8, False, 0, drop_last=True)) == len(ds) // 8

    sub = Subset(ds, [3, 1, 4])
    xb, yb = next(iter(loader(sub, 10, shuffle=False, seed=0)))
    assert torch.equal(xb, torch.stack([items[i][0] for i in (3, 1, 4)]))


def test_loader_augmentation_is_seeded_with_workers(fm_root: Path) -> None:
    ds = build_data(fm(fm_root, val_size=0, eval_on="test", augment=True), 0).train

    def epoch(seed: int, workers: int) -> torch.Tensor:
        return torch.cat([xb for xb, _ in loader(ds, 16, shuffle=True, seed=seed, num_workers=workers)])

    assert torch.equal(epoch(1, 0), epoch(1, 0))
    assert not torch.equal(epoch(1, 0), epoch(2, 0))
    with_workers = epoch(1, 2)
    assert with_workers.shape == (N_TRAIN, 1, 28, 28) and torch.equal(with_workers, epoch(1, 2))

    # Workers must not repeat each other's random crops: with identical images, batches would then match.
    same = InMemoryImages(
        torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8).expand(32, 1, 28, 28).contiguous(),
        torch.zeros(32, dtype=torch.long),
        (0.5,),
        augment=True,
    )
    first, second = [xb for xb, _ in loader(same, 16, shuffle=False, seed=0, num_workers=2)]
    assert not torch.equal(first, second)
