"""Which SOP classes and transfer syntaxes Carina negotiates."""
from __future__ import annotations

from functools import lru_cache

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# The classes a chest radiograph arrives in; everything else is stored and ignored.
CHEST_CAPABLE_SOP_CLASSES = (CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE)

UNCOMPRESSED = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)


@lru_cache(maxsize=1)
def decodable_transfer_syntaxes() -> tuple[str, ...]:
    """Syntaxes whose pixel data the installed pydicom plugins can decode.

    Offering only these for chest classes means a sender with, say, JPEG XL
    transcodes or fails at negotiation instead of being acknowledged for an
    image we could never score."""
    from pydicom.pixels import get_decoder

    usable = list(UNCOMPRESSED)
    for uid in ALL_TRANSFER_SYNTAXES:
        if uid in usable:
            continue
        try:
            if get_decoder(UID(uid)).is_available:
                usable.append(uid)
        except NotImplementedError:
            continue
    return tuple(usable)


def other_storage_classes() -> list[str]:
    return [
        cx.abstract_syntax
        for cx in StoragePresentationContexts
        if cx.abstract_syntax not in CHEST_CAPABLE_SOP_CLASSES
    ]


def accepts(sop_class: str, transfer_syntax: str) -> bool:
    """Whether the SCP would take an instance of this class in this syntax (what
    it negotiates): chest classes in a decodable syntax, other storage classes
    in any syntax pynetdicom knows. STOW-RS intake applies the same rule."""
    if sop_class in CHEST_CAPABLE_SOP_CLASSES:
        return transfer_syntax in decodable_transfer_syntaxes()
    return sop_class in _other_storage_classes() and transfer_syntax in ALL_TRANSFER_SYNTAXES


@lru_cache(maxsize=1)
def _other_storage_classes() -> frozenset[str]:
    return frozenset(other_storage_classes())
