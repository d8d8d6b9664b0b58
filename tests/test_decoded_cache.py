"""In this process, no launcher: the decoded-image cache of 02 (load_imagefolder). A cache
that is empty, cut short, not a cache at all or has a changed byte is rebuilt with a one-line
notice and the right pixels; an intact one is used without decoding the images again."""

import pytest
import torch
from harness import load_example, make_imagefolder

EXAMPLES = ["02_cifar10"]  # 03, the first rung, reads ImageFolder with no cache


@pytest.fixture(params=EXAMPLES)
def loader(request, tmp_path, monkeypatch):
    """(load, root, decodes): load() runs load_imagefolder on a small imagefolder and returns the
    train images; decodes counts the images decode_images was asked for."""
    mod = load_example(request.param)
    root = make_imagefolder(tmp_path / "imgs", n_train=30, n_test=12)
    decodes = []
    decode = mod.decode_images

    def counted(paths):
        decodes.append(len(paths))
        return decode(paths)

    monkeypatch.setattr(mod, "decode_images", counted)
    return lambda: mod.load_imagefolder(str(root), [str(root)])[0][0], root, decodes


def _damage(how, cache, images):
    data = cache.read_bytes()
    if how == "empty":
        cache.write_bytes(b"")
    elif how == "garbage":
        cache.write_bytes(b"this is not a zip archive\n" * 40)
    elif how == "truncated":
        cache.write_bytes(data[:len(data) // 2])
    else:  # one byte of the stored pixels changed, the zip around it intact
        at = data.index(images[5].numpy().tobytes())
        cache.write_bytes(data[:at + 100] + bytes([data[at + 100] ^ 0xFF]) + data[at + 101:])


@pytest.mark.parametrize("how", ["empty", "garbage", "truncated", "flipped byte"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(loader, how, capsys):
    load, root, decodes = loader
    images = load()
    [cache] = root.glob(".decoded-*.pt")
    _damage(how, cache, images)
    capsys.readouterr()
    again = load()
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and str(cache) in notice[0] and "decoding" in notice[0], notice
    assert torch.equal(again, images)
    assert len(decodes) == 2
    assert torch.equal(load(), images) and len(decodes) == 2, "the rebuilt cache was not reused"
    assert sorted(p.name for p in root.iterdir()) == [cache.name, "test", "train"]


def test_an_intact_cache_is_reused_without_decoding(loader, capsys):
    load, root, decodes = loader
    images = load()
    assert len(decodes) == 1 and len(list(root.glob(".decoded-*.pt"))) == 1
    capsys.readouterr()
    assert torch.equal(load(), images)
    assert len(decodes) == 1, "an intact cache was decoded again"
    assert capsys.readouterr().out == ""
