"""Labelled sets: which image has which findings, from a CSV.

Two formats, told apart by the header:

- **NIH ChestX-ray14** `Data_Entry_2017.csv`: `Image Index` names the file and
  `Finding Labels` lists its findings separated by `|`, or says `No Finding`.
  The NIH labels cover all 14 pathologies, so every image is labelled 0 or 1
  for each of them (a finding not listed is 0).
- **Columns**: an image column (`image`, `path`, `file` or `Image Index`) and
  one column per pathology, named as the model names it (`Pleural_Thickening`;
  case, spaces and underscores do not matter), holding 1 or 0. An empty cell
  means that image is not labelled for that pathology. A pathology without a
  column is *not evaluated* (never counted as negative); other columns are
  ignored and listed.

`carina feedback export` writes the columns format.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from inference.types import CHESTXRAY14

IMAGE_COLUMNS = ("image", "path", "file", "image index")
NIH_NO_FINDING = "No Finding"


class LabelError(ValueError):
    """The labels file cannot be read; the message names the line and the problem."""


@dataclass(frozen=True)
class LabelledImage:
    name: str  # as the labels file names it: a path relative to the images directory
    labels: dict[str, int]  # pathology -> 0/1, only the labelled ones


@dataclass(frozen=True)
class LabelledSet:
    path: Path
    format: str  # "nih" or "columns"
    sha256: str  # of the labels file's bytes
    images: tuple[LabelledImage, ...]
    pathologies: tuple[str, ...]  # labelled for at least one image, in CHESTXRAY14 order
    ignored_columns: tuple[str, ...] = ()

    @property
    def not_evaluated(self) -> tuple[str, ...]:
        return tuple(label for label in CHESTXRAY14 if label not in self.pathologies)

    def subset(self, names: set[str]) -> "LabelledSet":
        images = tuple(image for image in self.images if image.name in names)
        present = {label for image in images for label in image.labels}
        return LabelledSet(self.path, self.format, self.sha256, images,
                           tuple(label for label in CHESTXRAY14 if label in present), self.ignored_columns)


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


_BY_KEY = {_key(label): label for label in CHESTXRAY14}


def read_labels(path: str | Path) -> LabelledSet:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc}") from exc
    text = data.decode("utf-8-sig", errors="strict")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise LabelError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    sha = hashlib.sha256(data).hexdigest()
    if "Image Index" in header and "Finding Labels" in header:
        images = _nih(path, header, rows[1:])
        fmt, ignored = "nih", ()
    else:
        images, ignored = _columns(path, header, rows[1:])
        fmt = "columns"
    names = [image.name for image in images]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise LabelError(f"{path}: images listed more than once: {', '.join(twice[:5])}")
    present = {label for image in images for label in image.labels}
    return LabelledSet(path, fmt, sha, tuple(images), tuple(l for l in CHESTXRAY14 if l in present), ignored)


def _nih(path: Path, header: list[str], rows: list[list[str]]) -> list[LabelledImage]:
    image_col, findings_col = header.index("Image Index"), header.index("Finding Labels")
    images = []
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(image_col, findings_col):
            raise LabelError(f"{path}:{line}: too few columns")
        findings = [f.strip() for f in row[findings_col].split("|") if f.strip()]
        positive = set()
        for finding in findings:
            if finding == NIH_NO_FINDING:
                continue
            label = _BY_KEY.get(_key(finding))
            if label is None:
                raise LabelError(f"{path}:{line}: unknown NIH finding {finding!r}")
            positive.add(label)
        if NIH_NO_FINDING in findings and positive:
            raise LabelError(f"{path}:{line}: 'No Finding' together with findings {sorted(positive)}")
        images.append(LabelledImage(row[image_col].strip(), {label: int(label in positive) for label in CHESTXRAY14}))
    return images


def _columns(path: Path, header: list[str], rows: list[list[str]]) -> tuple[list[LabelledImage], tuple[str, ...]]:
    keys = [_key(h) for h in header]
    image_col = next((keys.index(_key(c)) for c in IMAGE_COLUMNS if _key(c) in keys), None)
    if image_col is None:
        raise LabelError(f"{path}: no image column (one of {', '.join(IMAGE_COLUMNS)}) in the header {header}")
    columns = {i: _BY_KEY[k] for i, k in enumerate(keys) if k in _BY_KEY}
    if not columns:
        raise LabelError(f"{path}: no pathology column; expected some of {', '.join(CHESTXRAY14)}")
    ignored = tuple(h for i, h in enumerate(header) if i != image_col and i not in columns)
    images = []
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        name = row[image_col].strip() if image_col < len(row) else ""
        if not name:
            raise LabelError(f"{path}:{line}: no image name")
        labels = {}
        for i, label in columns.items():
            cell = row[i].strip() if i < len(row) else ""
            if cell == "":
                continue  # not labelled for this pathology
            try:
                value = float(cell)
            except ValueError:
                value = None
            if value not in (0.0, 1.0):
                raise LabelError(f"{path}:{line}: {label} must be 1, 0 or empty, not {cell!r}")
            labels[label] = int(value)
        images.append(LabelledImage(name, labels))
    return images, ignored
