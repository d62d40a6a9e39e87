"""Builds realistic DICOM sources from the NIH PNGs at test time.

Real PACS traffic is mostly 12-16 bit DX/CR; the shared samples are 8-bit, so
tests generate the rest here instead of shipping binary fixtures.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DATA = Path(__file__).resolve().parent / "data"
NIH_PNGS = sorted(DATA.glob("nih_*.png"))
SIIM_MONO1 = DATA / "siim_cr_jpeg_mono1.dcm"
SIIM_MONO2 = DATA / "siim_cr_jpeg_mono2.dcm"

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


def png_pixels(path: Path = NIH_PNGS[0]) -> np.ndarray:
    """8-bit grey pixels of an NIH sample as uint8 [rows, cols]."""
    return np.asarray(Image.open(path).convert("L"))


def make_dx(
    pixels8: np.ndarray | None = None,
    *,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    sop_class_uid: str = DX_FOR_PRESENTATION,
    modality: str = "DX",
    study_uid: str | None = None,
    patient_id: str = "CARINA-TEST-001",
    patient_name: str = "Test^Patient",
    accession: str = "ACC0001",
    view_position: str = "PA",
    body_part: str = "CHEST",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    signed: bool = False,
) -> Dataset:
    """A for-presentation DX (default 16-bit) made from 8-bit PNG pixels.

    The 8-bit values are stretched to the full stored range, inverted for
    MONOCHROME1 so the *rendered* image is the same radiograph either way.
    """
    if pixels8 is None:
        pixels8 = png_pixels()
    maxval = 2**bits_stored - 1
    values = pixels8.astype(np.float64) / 255.0 * maxval
    if photometric == "MONOCHROME1":
        values = maxval - values
    if signed:
        values = values - 2 ** (bits_stored - 1)
    stored = np.rint(values).astype(np.int16 if signed else np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    now = dt.datetime(2026, 11, 21, 9, 30, 0)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "Carina Test Factory"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = f"Chest {view_position}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "F"] if view_position == "AP" else ["A", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION" if sop_class_uid != DX_FOR_PROCESSING else "FOR PROCESSING"
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.DetectorType = "SCINTILLATOR"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept, ds.RescaleSlope = rescale if rescale else (0, 1)
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.ImageLaterality = "U"  # a PA chest images both sides: "unpaired"
    ds.LossyImageCompression = "00"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.PatientPosition = ""
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    if window is None and sop_class_uid == DX_FOR_PRESENTATION:
        # DX for presentation must carry a VOI; a full-range window is neutral.
        window = ((maxval + 1) / 2 - (2 ** (bits_stored - 1) if signed else 0), maxval + 1)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --- transfer-syntax variants (used by tests/test_inference_decode.py) ---------------------


def encoded(ds: Dataset, syntax: str, **encoding_kwargs) -> Dataset:
    """A copy of `ds` compressed by pydicom's own encoders.

    With the installed plugins pydicom 3 can *encode* RLE Lossless, JPEG-LS
    lossless/near-lossless (pyjpegls) and JPEG 2000 lossless/lossy
    (pylibjpeg-openjpeg); the JPEG 10918 family needs dcmtk (`transcoded`).
    """
    import copy

    out = copy.deepcopy(ds)
    out.compress(syntax, **encoding_kwargs)
    return reread(out)


def deflated(ds: Dataset) -> Dataset:
    """`ds` written as Deflated Explicit VR Little Endian and read back."""
    import copy

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return reread(out)


def transcoded(ds: Dataset, tool: str, *args: str) -> Dataset:
    """`ds` run through a dcmtk converter, e.g. ("/usr/bin/dcmcjpeg", "+e1") for JPEG Lossless SV1."""
    import subprocess
    import tempfile

    import pydicom

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        write(ds, src)
        proc = subprocess.run([tool, *args, str(src), str(dst)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(tool).name} {' '.join(args)} failed: {proc.stderr or proc.stdout}")
        return pydicom.dcmread(dst)  # reads everything into memory before the directory goes


def htj2k(ds: Dataset, tool: str, *, rpcl: bool = False) -> Dataset:
    """`ds` as HTJ2K Lossless (1.2.840.10008.1.2.4.201), or with `rpcl` HTJ2K with
    RPCL Options Lossless (.202), coded by OpenJPH's ojph_compress (Debian
    openjph-tools) from a PGM of the stored values and encapsulated by pydicom."""
    import copy
    import subprocess
    import tempfile

    from pydicom.encaps import encapsulate

    pixels = ds.pixel_array
    if pixels.dtype.kind == "i":
        raise ValueError("PGM carries unsigned samples only")
    maxval = 2 ** int(ds.BitsStored) - 1
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pgm", Path(tmp) / "out.j2c"
        rows, cols = pixels.shape
        sample = ">u2" if maxval > 255 else "u1"  # PGM stores 16-bit samples big-endian
        src.write_bytes(f"P5\n{cols} {rows}\n{maxval}\n".encode() + pixels.astype(sample).tobytes())
        order = ["-prog_order", "RPCL"] if rpcl else []
        proc = subprocess.run([tool, "-i", str(src), "-o", str(dst), "-reversible", "true", *order],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"ojph_compress failed: {proc.stderr or proc.stdout}")
        codestream = dst.read_bytes()
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.202" if rpcl else "1.2.840.10008.1.2.4.201"
    out.PixelData = encapsulate([codestream])
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    return reread(out)


def absurd_dimensions_dx() -> Dataset:
    """A header claiming 60000 x 60000 16-bit pixels with 16 bytes of pixel data:
    the pixel budget must refuse it before any decoder is asked."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 60000
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\x00\x00" * 8
    return ds


def reread(ds: Dataset) -> Dataset:
    """Round-trip through bytes, so the result is exactly what a receiver would parse."""
    import io

    import pydicom

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def with_voi_lut(
    ds: Dataset, lut: np.ndarray, *, first_mapped: int = 0, bits_per_entry: int = 16, vr: str = "OW"
) -> Dataset:
    """Add a VOI LUT Sequence item mapping stored values first_mapped.. through `lut`.

    LUT Data may be OW (16-bit words, the usual encoding) or US.
    """
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(lut) % 65536, first_mapped, bits_per_entry])
    if vr == "OW":
        item.add_new("LUTData", "OW", np.asarray(lut, dtype="<u2").tobytes())
    else:
        item.add_new("LUTData", "US", [int(v) for v in lut])
    item.LUTExplanation = "test VOI LUT"
    ds.VOILUTSequence = [item]
    return ds


# --- small distinct radiographs for the durability and routing tests -------------


def small_chest_pixels(n: int = 0, size: int = 256, *, crop_fraction: float | None = None, offset: tuple[float, float] | None = None) -> np.ndarray:
    """A distinct `size`x`size` uint8 chest image: crop `n` of an NIH sample, resized.

    Small images keep node-level tests fast; `n` varies the source, the crop
    and its position deterministically so no two studies share pixels."""
    src = png_pixels(NIH_PNGS[n % len(NIH_PNGS)])
    h, w = src.shape
    frac = crop_fraction if crop_fraction is not None else 0.75 + 0.25 * ((n * 7919) % 101) / 100
    crop = max(16, int(frac * min(h, w)))
    fy, fx = offset if offset is not None else (((n * 104729) % 97) / 96, ((n * 1299709) % 89) / 88)
    y, x = int(fy * (h - crop)), int(fx * (w - crop))
    return np.asarray(Image.fromarray(src[y:y + crop, x:x + crop]).resize((size, size), Image.BILINEAR))


# --- raw Part 10 files for hostile-input tests ------------------------------------


def file_meta_bytes(sop_class: str, sop_uid: str, syntax: str) -> bytes:
    """Preamble, 'DICM' and a valid File Meta group: what a sender needs to name the
    SOP class, instance and transfer syntax of whatever bytes follow."""
    import io

    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1249.99"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    out.write(buf.getvalue())
    return out.getvalue()


def dataset_bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The encoded dataset body (no preamble or meta) in `syntax`'s VR/endianness."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    uid = UID(syntax)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = uid.is_little_endian, uid.is_implicit_VR
    write_dataset(buf, ds)
    return buf.getvalue()


def write_raw(path: Path, sop_class: str, sop_uid: str, syntax: str, body: bytes) -> Path:
    """A Part 10 file whose dataset is exactly `body`, valid or not."""
    path.write_bytes(file_meta_bytes(sop_class, sop_uid, syntax) + body)
    return path


def write_huge_dx(path: Path, rows: int, cols: int, **make_dx_kwargs) -> Path:
    """A 16-bit DX whose Pixel Data really is rows*cols*2 bytes, written sparsely
    (no RAM, no time): a '1 GB instance' for the size-limit tests."""
    import struct

    ds = make_dx(np.zeros((2, 2), np.uint8), **make_dx_kwargs)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    length = rows * cols * 2
    assert length % 2 == 0 and length < 2**32 - 1
    head = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian) + dataset_bytes(ds)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    with open(path, "wb") as fh:
        fh.write(head + pixel_header)
        fh.truncate(len(head) + len(pixel_header) + length)
    return path
