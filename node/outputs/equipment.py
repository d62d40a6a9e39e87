"""Who made an output object: the General Equipment values and the
Contributing Equipment Sequence (0018,A001) shared by the SR and SC builders.

IHE AI Results (AIR) asks for one Contributing Equipment item per algorithm,
with Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm") and a
Device UID that changes whenever the model changes. highdicom's
`ContributingEquipment` only accepts the DCM purposes and has no Device UID,
so the algorithm item is built here as a plain dataset.
"""
from __future__ import annotations

import datetime as dt

from highdicom import ContributingEquipment
from pydicom.dataset import Dataset
from pydicom.valuerep import DT

from inference.types import ModelInfo
from node.outputs import uids
from node.outputs.text import plain

MANUFACTURER = "Carina"
DEVICE_NAME = "Carina"
# The purpose code IHE AIR assigns to an AI algorithm's equipment item.
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")


def device_uid(model: ModelInfo) -> str:
    return uids.device_uid(model.name, model.version, model.weights_sha256)


def software_versions(model: ModelInfo) -> str:
    # LO is 64 characters; model versions are short, but a long imported
    # version string must not make the whole object unencodable.
    return model.version[:64]


def algorithm_equipment(
    model: ModelInfo,
    *,
    manufacturer: str = MANUFACTURER,
    contributed_at: dt.datetime | None = None,
) -> Dataset:
    item = Dataset()
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = manufacturer
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = software_versions(model)
    item.DeviceUID = device_uid(model)
    if contributed_at is not None:
        item.ContributionDateTime = DT(contributed_at)
    description = "AI inference (chest X-ray findings)"
    if model.members:  # ensembles only: a single model's item is unchanged
        description += " by an ensemble of " + ", ".join(member.ref for member in model.members)
    if model.caveat:
        # Nested text: ASCII, so dcmjs (OHIF) reads it as written (node/outputs/text.py).
        description += f" - {plain(model.caveat)}"
    item.ContributionDescription = description
    return item


def contributing_equipment(
    sources: list[Dataset],
    model: ModelInfo,
    *,
    manufacturer: str = MANUFACTURER,
    contributed_at: dt.datetime | None = None,
) -> list[Dataset]:
    """The sources' acquisition devices (those the headers name) then the algorithm.

    Replaces highdicom's own default sequence, whose "highdicom" item carries
    the wall-clock time and would make otherwise identical objects differ.
    """
    items: list[Dataset] = []
    seen: set[tuple[str, str, str]] = set()
    for source in sources:
        key = tuple(str(source.get(k, "") or "") for k in ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber"))
        if key in seen:
            continue
        seen.add(key)
        try:
            items.append(ContributingEquipment.for_image_acquisition(source))
        except (AttributeError, ValueError, KeyError):
            pass  # no Manufacturer in the header: nothing truthful to say
    items.append(algorithm_equipment(model, manufacturer=manufacturer, contributed_at=contributed_at))
    return items


def series_description(base: str, model: ModelInfo, detail: str = "") -> str:
    """`base` + `detail`, or `base` + the demo caveat, within the LO limit of 64.

    The caveat wins over `detail` and, if need be, over the end of `base`:
    it is the one part a reader must not miss. It is written in ASCII
    ("DEMO WEIGHTS - NOT FOR CLINICAL USE"), which every PACS and toolkit
    shows as written (node/outputs/text.py); the limit is counted in UTF-8
    bytes, as dciodvfy counts it.
    """
    if not model.caveat:
        return _fit(f"{base}{detail}", 64)
    tail = f" - {plain(model.caveat)}"
    return _fit(base, 64 - len(tail.encode())) + tail


def _fit(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding is at most `limit` bytes."""
    return text.encode()[:limit].decode(errors="ignore")
