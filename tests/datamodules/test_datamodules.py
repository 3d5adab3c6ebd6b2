import numpy as np
import pytest
import torch

from lightning_probes.datamodules import CIFAR10DataModule, DigitsDataModule, MNISTDataModule


@pytest.mark.parametrize(("cls", "shape"), [(MNISTDataModule, (1, 28, 28)), (CIFAR10DataModule, (3, 32, 32))])
def test_loads_tiny_files_in_real_format(cls, shape, tiny_data):
    dm = cls(data_dir=str(tiny_data), batch_size=8, val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 30, 40)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Normalisation: pixel p maps to (p / 255 - mean) / std.
    raw = dm.val_set.images[0].float() / 255
    expected = (raw - torch.tensor(dm.mean).view(-1, 1, 1)) / torch.tensor(dm.std).view(-1, 1, 1)
    assert torch.allclose(dm.val_set[0][0], expected)


def test_split_is_seeded_and_disjoint(tiny_data):
    def ids(seed):
        dm = MNISTDataModule(data_dir=str(tiny_data), val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return [tuple(img.flatten()[:16].tolist()) for img in dm.val_set.images], dm

    a, dm = ids(1)
    b, _ = ids(1)
    c, _ = ids(2)
    assert a == b and a != c
    train = {tuple(img.flatten()[:16].tolist()) for img in dm.train_set.images}
    assert not train & set(a)


def test_train_half_and_swap(tiny_data):
    full = MNISTDataModule(data_dir=str(tiny_data), val_fraction=0.25)
    full.setup("fit")
    halves = []
    for half in (0, 1):
        dm = MNISTDataModule(data_dir=str(tiny_data), val_fraction=0.25, train_half=half)
        dm.setup("fit")
        assert len(dm.train_set) == 45
        assert torch.equal(dm.val_set.images, full.val_set.images)
        halves.append({tuple(x.flatten().tolist()) for x in dm.train_set.images})
    assert not halves[0] & halves[1]
    assert halves[0] | halves[1] == {tuple(x.flatten().tolist()) for x in full.train_set.images}
    swapped = MNISTDataModule(data_dir=str(tiny_data), val_fraction=0.25, swap_train_val=True)
    swapped.setup("fit")
    assert torch.equal(swapped.train_set.images, full.val_set.images)
    assert torch.equal(swapped.val_set.images, full.train_set.images)


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_missing_files_error_names_directory_and_files(cls, tmp_path):
    dm = cls(data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "empty") in message
    assert ("train-images-idx3-ubyte" in message) or ("cifar10_train.npz" in message)


def test_download_failure_is_clear(tmp_path, monkeypatch):
    import lightning_probes.datamodules.mnist as mnist

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnist, "MNIST", offline)
    with pytest.raises(ConnectionError, match="Could not download MNIST.*network unreachable"):
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()


def test_cifar_npz_bad_shape(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for split in ("train", "test"):
        np.savez(folder / f"cifar10_{split}.npz", x=np.zeros((4, 32, 32), np.uint8), y=np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="uint8 \\(N, 32, 32, 3\\)"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")


def test_digits_offline_default():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and int(y.max()) <= 9


def test_augmentation_changes_training_images(tiny_data):
    dm = CIFAR10DataModule(data_dir=str(tiny_data), augment=True, seed=3)
    dm.setup("fit")
    torch.manual_seed(0)
    first = torch.stack([dm.train_set[0][0] for _ in range(5)])
    assert not all(torch.equal(first[0], f) for f in first[1:])
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


@pytest.mark.parametrize(("kwargs", "match"), [({"batch_size": 0}, "`batch_size`"),
                                               ({"val_fraction": 1.0}, "`val_fraction`"),
                                               ({"train_half": 2}, "`train_half`")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)
