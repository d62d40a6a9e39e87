"""Radiograph decoding: DICOM or PNG/JPEG bytes in, a display-ready `DecodedImage` out.

The DICOM grey pipeline is applied in the standard's order (PS3.4 N.2.1):
stored values -> Modality LUT (rescale) -> VOI LUT or window -> MONOCHROME1
inversion, so `pixels` always reads "larger = brighter" in 0..`maxval`.

Every failure is a `DecodeError` whose message names the problem, because the
pipeline records it verbatim against the instance for the operator to read.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.dicom_file import InflateLimitExceeded, dcmread_bounded
from inference.types import DecodedImage

# 60 MP: well above the largest detectors (43x43 cm at 0.1 mm is ~18.5 MP) yet
# small enough that one decoded float32 frame (240 MB) cannot exhaust the node.
DEFAULT_MAX_PIXELS = 60_000_000

_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DecodeError(ValueError):
    """The input cannot be turned into a greyscale radiograph; the message says why."""


def decode_dicom(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode the first frame of a greyscale DICOM image.

    Header checks (presence of pixels, greyscale, size, transfer syntax) run
    before any pixel is touched, so a hostile header costs nothing.
    """
    rows, cols = _check_header(ds, max_pixels)
    stored = _decode_first_frame(ds)
    if stored.shape != (rows, cols):
        raise DecodeError(f"decoded frame is {stored.shape}, header says {rows}x{cols}")
    pixels, maxval = _grey_pipeline(stored, ds)
    return DecodedImage(pixels=pixels, maxval=maxval, source_shape=(rows, cols))


def decode_dicom_file(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read a DICOM Part 10 file (or a bare dataset) and decode it."""
    try:
        ds = dcmread_bounded(path, force=True)  # a Deflated dataset is inflated in chunks, capped
    except InflateLimitExceeded as exc:
        raise DecodeError(str(exc)) from exc
    except Exception as exc:  # pydicom raises many types for truncated/garbage files
        raise DecodeError(f"not a readable DICOM file: {exc}") from exc
    return decode_dicom(ds, max_pixels=max_pixels)


def decode_png_or_jpeg(data: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an 8- or 16-bit greyscale PNG/JPEG (as xrv's `load_image` would read it).

    Grey stored as RGB (common for exported screenshots) is accepted when the
    three channels agree; real colour is refused like an RGB DICOM.
    """
    from PIL import Image, UnidentifiedImageError

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else Path(data)
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as exc:  # Pillow's own, far higher, size limit
        raise DecodeError(f"image header declares an absurd size; refused before decoding: {exc}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DecodeError(f"not a PNG/JPEG image: {exc}") from exc
    with image:
        cols, rows = image.size  # header only; nothing decoded yet
        _check_size(rows, cols, max_pixels)
        mode = image.mode
        try:
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(image, dtype=np.int64 if mode == "I" else np.uint16)
                maxval = 65535.0
            elif mode in ("L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "1"):
                arr = _grey_from_8bit(image)
                maxval = 255.0
            else:
                raise DecodeError(f"unsupported image mode {mode!r}")
        except DecodeError:
            raise
        except Exception as exc:  # truncated or corrupt streams surface at load time
            raise DecodeError(f"cannot decode {image.format or 'image'}: {exc}") from exc
    if arr.min() < 0 or arr.max() > maxval:
        raise DecodeError(f"pixel values {arr.min()}..{arr.max()} outside 0..{maxval:g}")
    return DecodedImage(pixels=arr.astype(np.float32), maxval=maxval, source_shape=(rows, cols))


# --- header checks -----------------------------------------------------------


def _check_header(ds: Dataset, max_pixels: int) -> tuple[int, int]:
    present = [tag for tag in _PIXEL_DATA_TAGS if tag in ds]
    if not present:
        raise DecodeError("no Pixel Data (7FE0,0010) in the dataset")
    if present[0] != "PixelData":
        raise DecodeError(f"{present[0]} (floating-point pixels) is not a radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(
            f"not a greyscale radiograph: PhotometricInterpretation={photometric or 'missing'}, "
            f"SamplesPerPixel={samples}"
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise DecodeError(f"missing or zero Rows/Columns ({rows!r} x {cols!r})")
    rows, cols = int(rows), int(cols)
    _check_size(rows, cols, max_pixels)
    bits_allocated, bits_stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if bits_allocated not in (8, 16) or not bits_stored or not 1 <= int(bits_stored) <= int(bits_allocated):
        raise DecodeError(
            f"unsupported bit depth: BitsAllocated={bits_allocated}, BitsStored={bits_stored} "
            "(a radiograph has 8 or 16 bits allocated and at most 16 stored)"
        )
    return rows, cols


def _check_size(rows: int, cols: int, max_pixels: int) -> None:
    if rows * cols > max_pixels:
        raise DecodeError(
            f"image of {rows}x{cols} = {rows * cols:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels; refused before decoding"
        )


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        # A dataset built in memory (or read without meta) is native little endian.
        is_little, is_implicit = getattr(ds, "original_encoding", (None, None))
        if is_little is False:
            return UID("1.2.840.10008.1.2.2")
        return UID("1.2.840.10008.1.2") if is_implicit else ExplicitVRLittleEndian
    return UID(uid)


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    syntax = _transfer_syntax(ds)
    label = f"transfer syntax {syntax} ({syntax.name})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DecodeError(f"{label} cannot be decoded: no decoder exists for it") from None
    if not decoder.is_available:
        raise DecodeError(
            f"{label} cannot be decoded: its decoder plugins are not installed ({decoder.missing_dependencies})"
        )
    try:
        # as_array (not ds.pixel_array) decodes one frame and caches nothing on ds.
        frame, _ = decoder.as_array(ds, index=0)
    except Exception as exc:
        raise DecodeError(f"cannot decode pixel data with {label}: {exc}") from exc
    if frame.ndim != 2:
        raise DecodeError(f"decoded frame has shape {frame.shape}; expected one greyscale plane")
    return frame


# --- the grey pipeline -------------------------------------------------------


def _grey_pipeline(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float]:
    """Modality LUT, VOI, MONOCHROME1 inversion; returns (float32 pixels, maxval).

    Memory: one float32 working array, updated in place from the rescale to
    the inversion (the arithmetic, and so every bit of the result, is the
    same as with temporaries). Peak for a native 16-bit frame is about 8 bytes
    per pixel on top of the dataset: stored 2, decoded copy 2, working array 4
    (tests/test_inference_decode.py measures a 4k x 4k DX).
    """
    values, value_range = _modality(stored, ds)  # a fresh float32 array this pipeline owns

    if _has_voi_lut(ds):
        lut = _Lut.from_item(ds.VOILUTSequence[0], ds)
        pixels, maxval = lut.apply(values), float(lut.output_max)
        del values
    elif _has_window(ds):
        maxval = float(2 ** int(ds.BitsStored) - 1)
        pixels = _window_fraction(values, ds)  # in place
        pixels *= maxval
    else:
        # No VOI: like torchxrayvision, stretch the *possible* range, not the
        # image's actual min..max (which would make each image's contrast depend
        # on its own content and on collimator edges). For unsigned pixels with
        # a positive slope this is exactly xrv's `x / (2**BitsStored-1)`.
        lo, hi = value_range
        maxval = float(2 ** int(ds.BitsStored) - 1)
        pixels = values
        pixels -= lo
        pixels /= max(hi - lo, 1e-12)
        pixels *= maxval

    pixels = pixels.astype(np.float32, copy=False)
    np.clip(pixels, 0.0, maxval, out=pixels)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        np.subtract(np.float32(maxval), pixels, out=pixels)
    return pixels, maxval


def _modality(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply the Modality LUT/rescale; also return the range the output can span."""
    if ds.get("ModalityLUTSequence"):
        lut = _Lut.from_item(ds.ModalityLUTSequence[0], ds)
        return lut.apply(stored), (0.0, float(lut.output_max))  # float32, fresh
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        stored_lo, stored_hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        stored_lo, stored_hi = 0, 2**bits - 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    # float32 holds every 16-bit stored value exactly; the rescale adds ~1e-7 relative error.
    values = stored.astype(np.float32)  # then in place: the same float32 arithmetic, no temporaries
    if slope != 1:
        values *= np.float32(slope)
    if intercept:
        values += np.float32(intercept)
    ends = sorted((stored_lo * slope + intercept, stored_hi * slope + intercept))
    # A negative slope flips the order; brighter is still "larger after rescale".
    return values, (ends[0], ends[1])


class _Lut:
    """A Modality or VOI LUT item (PS3.3 C.11.1/C.11.2).

    Applied here rather than with pydicom's `apply_voi`, which builds its index
    array in the LUT's entry dtype: with 8-bit entries every input above 255
    wraps around (a 12-bit image through an 8-bit VOI LUT comes out as noise).
    """

    def __init__(self, entries: np.ndarray, first_mapped: int, declared_bits: int) -> None:
        self.entries = entries.astype(np.float32)  # LUT entries are <= 16 bits: exact in float32
        self.first_mapped = first_mapped
        self.output_max = _lut_output_max(entries, declared_bits)

    @classmethod
    def from_item(cls, item: Dataset, ds: Dataset) -> "_Lut":
        n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
        n_entries = n_entries or 65536  # 0 means 2**16 entries
        if int(ds.get("PixelRepresentation", 0)) == 1 and first_mapped > 32767:
            first_mapped -= 65536  # SS value read through a US VR
        data = item.LUTData
        if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the dataset's byte order
            little = getattr(ds, "original_encoding", (True, None))[0] is not False
            meta = getattr(ds, "file_meta", None)
            if meta is not None and meta.get("TransferSyntaxUID"):
                little = UID(meta.TransferSyntaxUID) != UID("1.2.840.10008.1.2.2")
            entries = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
        else:
            entries = np.atleast_1d(np.asarray(data, dtype=np.int64))
        if entries.size < n_entries:
            raise DecodeError(f"LUT has {entries.size} entries, its descriptor says {n_entries}")
        return cls(entries[:n_entries], first_mapped, bits)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """float32 LUT output for `values` (not modified).

        Entries are indexed by integer input values; rescaled values of integer
        stored pixels are integral, so rounding only removes float noise. The
        index is int32 (4 bytes a pixel, not intp's 8) built in one buffer.
        """
        if np.issubdtype(values.dtype, np.integer):
            index = values.astype(np.int32)
        else:
            index = np.rint(values).astype(np.int32)
        index -= self.first_mapped
        np.clip(index, 0, len(self.entries) - 1, out=index)
        return np.take(self.entries, index)


def _lut_output_max(entries: np.ndarray, declared_bits: int) -> int:
    """Largest value a LUT can output.

    The descriptor's bit depth is the standard answer, but some vendors write
    16 while filling a 12-bit LUT, which would render almost black. So use the
    fewest bits (8..declared) that hold the LUT's largest entry.
    """
    needed = max(8, int(entries.max()).bit_length()) if entries.size else declared_bits
    return 2 ** min(needed, max(declared_bits, 8)) - 1


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _window_fraction(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Window to 0..1 with the first of possibly several windows (PS3.3 C.11.2.1.2-3).

    `values` (float32, owned by the caller's pipeline) is overwritten with the result.

    The formulas are pydicom's `apply_windowing` (a test holds them equal), but
    written here because pydicom's output range depends on BitsStored, signedness
    and the rescale of `ds` (negative for signed data, reversed for a negative
    slope), it writes into `ds`, and its masked float64 passes cost ~40 ms on a
    3k x 2.5k DX against ~8 ms for this.
    """
    center = _first(ds["WindowCenter"].value)
    width = _first(ds["WindowWidth"].value)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    x = values.astype(np.float32, copy=False)
    if function == "LINEAR":
        if width < 1:
            raise DecodeError(f"invalid window: a LINEAR Window Width must be >= 1, got {width:g}")
        if width == 1:  # degenerate: a threshold at center - 0.5
            np.greater(x, center - 0.5, out=x)
            return x
        x -= center - 0.5
        x /= width - 1
        x += 0.5
    elif width <= 0:
        raise DecodeError(f"invalid window: Window Width must be > 0 for {function}, got {width:g}")
    elif function == "LINEAR_EXACT":
        x -= center
        x /= width
        x += 0.5
    elif function == "SIGMOID":
        # Clipped exponent: a narrow sigmoid would overflow float32 where it is 0 or 1 anyway.
        x -= center
        x *= -4.0
        x /= width
        np.clip(x, -80.0, 80.0, out=x)
        np.exp(x, out=x)
        x += 1.0
        np.reciprocal(x, out=x)
        return x
    else:
        raise DecodeError(f"invalid window: unsupported VOI LUT Function {function!r}")
    np.clip(x, 0.0, 1.0, out=x)
    return x


def _first(value) -> float:
    """Window Center/Width may hold several alternative windows; the first is the default."""
    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _grey_from_8bit(image) -> np.ndarray:
    if image.mode in ("L", "1"):
        return np.asarray(image.convert("L"))
    if image.mode == "LA":
        return np.asarray(image.getchannel("L"))
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    # JPEG chroma subsampling leaves a few levels of colour noise on grey images.
    if np.abs(rgb - rgb[..., :1]).max() > 8:
        raise DecodeError(f"not a greyscale radiograph: {image.mode} image with distinct colour channels")
    return rgb[..., 0].astype(np.uint8)  # channel 0, as torchxrayvision's load_image takes
