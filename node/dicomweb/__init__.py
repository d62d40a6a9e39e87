"""DICOMweb (PS3.18): STOW-RS in (`stow.py`), QIDO-RS and WADO-RS over Carina's
outputs (`query.py`), the multipart/related body both ways (`multipart.py`)
and the DICOM JSON model (`json_model.py`). The HTTP routes are
node/api/dicomweb_routes.py; STOW-RS out is node/destinations/dicomweb.py."""
