import subprocess
import sys

from pydicom.uid import UID

from node.outputs import uids


def test_derived_uids_are_deterministic_valid_and_distinct():
    a = uids.sc_instance_uid("1.2.3", "v1", "summary")
    assert a == uids.sc_instance_uid("1.2.3", "v1", "summary")
    assert UID(a).is_valid and len(a) <= 64 and a.startswith("2.25.")
    others = {
        uids.sc_instance_uid("1.2.3", "v2", "summary"),
        uids.sc_instance_uid("1.2.3", "v1", "Pneumothorax"),
        uids.sc_instance_uid("1.2.4", "v1", "summary"),
        uids.derived_uid("sc", "1.2.3v1", "summary"),  # separator matters
    }
    assert a not in others and len(others) == 4


def test_sr_uid_ignores_source_order_but_not_version():
    assert uids.sr_instance_uid(["1.2", "1.3"], "v", 1) == uids.sr_instance_uid(["1.3", "1.2"], "v", 1)
    assert uids.sr_instance_uid(["1.2"], "v", 1) != uids.sr_instance_uid(["1.2"], "v", 2)


def test_same_uid_in_another_process():
    code = "from node.outputs import uids; print(uids.device_uid('m', 'v', None))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == uids.device_uid("m", "v", None)


def test_each_output_kind_has_its_own_uids():
    """A SEG, a GSPS and an SC of the same image and model never share a UID,
    and neither do their series."""
    instances = {
        uids.seg_instance_uid("1.2.3", "m@v"),
        uids.gsps_instance_uid("1.2.3", "m@v"),
        uids.sc_instance_uid("1.2.3", "m@v", "summary"),
        uids.seg_instance_uid("1.2.3", "m@w"),
        uids.gsps_instance_uid("1.2.4", "m@v"),
    }
    assert len(instances) == 5 and all(UID(u).is_valid and len(u) <= 64 for u in instances)
    assert uids.seg_instance_uid("1.2.3", "m@v") == uids.seg_instance_uid("1.2.3", "m@v")
    series = {uids.series_uid("1.9", "m@v", kind) for kind in ("sr", "sc", "seg", "gsps")}
    assert len(series) == 4
