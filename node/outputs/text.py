"""Text in the DICOM objects Carina writes, so every reader decodes it as written.

dcmjs (which OHIF and Cornerstone3D use to read Part 10 files) applies
Specific Character Set only at the top level of a dataset and decodes text
inside sequences as Latin-1: a UTF-8 em dash in an SR content item or a SEG
segment came out as "â" in OHIF (tests/js/ohif_sr_check.mjs). So text that
lives in sequences is kept ASCII (`plain`), and Specific Character Set is
declared only when some value really needs it (`declare_character_set`),
which also spares older PACS a UTF-8 declaration they may not support.
"""
from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference.types import ModelInfo

UTF8 = "ISO_IR 192"
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_ASCII_FOR = {"\u2014": "-", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}


def plain(text: str) -> str:
    """`text` with typographic punctuation as ASCII (the demo caveat's em dash)."""
    return "".join(_ASCII_FOR.get(ch, ch) for ch in text)


def plain_caveat(model: ModelInfo) -> str | None:
    """The demo caveat as nested text carries it: "DEMO WEIGHTS - NOT FOR CLINICAL USE"."""
    return plain(model.caveat) if model.caveat else None


def declare_character_set(ds: Dataset) -> None:
    """Specific Character Set ISO_IR 192 if any text value is not ASCII, else none.

    Call it on the finished object: pydicom encodes every text value with the
    dataset's character set when it is written, and ASCII is the same bytes
    in the default repertoire and in UTF-8.
    """
    if any(_non_ascii(element.value) for element in ds.iterall() if element.VR in _TEXT_VRS):
        ds.SpecificCharacterSet = UTF8
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


def _non_ascii(value) -> bool:
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return any(v is not None and not str(v).isascii() for v in values)
