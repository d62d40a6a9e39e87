import sys
from pathlib import Path

# Test helpers (dicom_factory, peers) are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
