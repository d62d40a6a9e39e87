"""The audit trail: who did what to which patient's data, as DICOM audit
messages (PS3.15 A.5) in a hash chain (trail.py), built per event (events.py),
optionally forwarded to syslog (syslog.py)."""
