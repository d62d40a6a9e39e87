"""The kept display rendition (node/renditions.py): an uncompressed `.npy`
written in the background, read back exactly, never unpickled; a file cut
short or foreign is treated as missing, so the source is decoded again."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import dicom_factory as f
from inference import decode_dicom
from node.outputs.sc import display_rendition
from node.rendering import source_png
from node.renditions import Renditions, read_rendition, rendition_bytes


def test_a_kept_rendition_reads_back_exactly_from_memory_and_from_disk(tmp_path):
    picture = np.random.default_rng(7).integers(0, 256, (300, 200), dtype=np.uint8)
    path = tmp_path / "v1" / "1.2.3.npy"
    kept = Renditions(keep=2)
    kept.keep(path, picture)
    assert kept.get(path) is picture  # served from memory while the write runs
    kept.settle([path])  # waits for the file, then forgets the pixels
    assert kept.get(path) is None
    assert np.array_equal(read_rendition(path), picture)


def test_a_rendition_cut_short_or_foreign_is_refused_and_never_unpickled(tmp_path):
    whole = rendition_bytes(np.zeros((64, 64), np.uint8))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(whole[: len(whole) // 2])
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([object()], dtype=object), allow_pickle=True)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((4, 4), np.uint16))
    for path in (cut, pickled, wide):
        with pytest.raises(ValueError):
            read_rendition(path)
    with pytest.raises(FileNotFoundError):
        read_rendition(tmp_path / "absent.npy")


def test_the_reading_app_decodes_the_source_again_when_the_rendition_is_cut_short(tmp_path):
    ds = f.make_dx(f.png_pixels(f.NIH_PNGS[0])[::8, ::8])
    source = tmp_path / "source.dcm"
    ds.save_as(source, enforce_file_format=True)
    expected = display_rendition(decode_dicom(ds))
    display = tmp_path / "display.npy"
    display.write_bytes(rendition_bytes(expected)[:100])
    served = np.asarray(Image.open(io.BytesIO(source_png(display, source))))
    assert np.array_equal(served, expected)
    with pytest.raises(FileNotFoundError):
        source_png(display, None)
