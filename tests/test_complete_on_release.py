"""`dicom.complete_on_release` with a real sender (dcmtk dcmsend) and a real
PACS (Orthanc), and the heatmap SCs' size (`outputs.sc.max_side`) as the PACS
receives them.

The stability window is an hour, so a study that reaches the PACS was
completed by the release of the association that brought it, not by quiet time.
"""
from __future__ import annotations

import numpy as np
from dicom_factory import make_dx, png_pixels, write
from peers import dcmsend, http_json, node_with_pacs, study_state, wait_until
from PIL import Image
from pydicom import dcmread


def _large_dx(path):
    # 1536x1280: larger than the SCs' default 1024 on the long side.
    pixels = np.asarray(Image.fromarray(png_pixels()).resize((1280, 1536), Image.Resampling.BILINEAR))
    return write(make_dx(pixels, bits_stored=12), path)


def test_a_study_completes_when_its_association_is_released(tmp_path):
    source = _large_dx(tmp_path / "dx.dcm")
    study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    with node_with_pacs(tmp_path, stable_seconds=3600,
                        extra={"dicom": {"complete_on_release": True}, "outputs": {"kinds": ["sr", "sc"]}}) as (node, pacs):
        proc = dcmsend(node.dicom_port, source)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: (study_state(node, study_uid) or {}).get("state") == "done", 120,
                   what="the study processed long before its hour-long window")
        view = node.api(f"/api/v1/studies/{study_uid}")
        expected_scs = 1 + sum(1 for image in view["images"] for f in image["findings"] if f["positive"])
        wait_until(lambda: len(pacs.study_instances(study_uid)) == 1 + expected_scs, 60, what="the SR and SCs at the PACS")
        sizes = []
        for item in pacs.study_instances(study_uid):
            tags = http_json(f"{pacs.url}/instances/{item['ID']}/simplified-tags")
            if tags.get("SeriesNumber") == "9902":
                sizes.append((int(tags["Columns"]), int(tags["Rows"])))
        # Each SC is drawn at most 1024 on the long side (the caption band is added above).
        assert len(sizes) == expected_scs
        for columns, rows in sizes:
            assert columns == round(1280 * 1024 / 1536)
            assert 1024 < rows < 1024 + 300
