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
