"""A tolerant reader and writer for HL7 v2 ER7 text (the pipe-and-hat encoding).

Carina builds its own ORU messages with hl7apy (node/outputs/hl7_oru.py); this
module is for what other systems send: ACKs, orders, ADT. Those come in any
v2 version, with CR or LF segment ends, so reading them field by field is
more robust than a full structural parse. Values are unescaped (\\F\\ \\S\\ \\R\\
\\E\\ \\T\\); \\X..\\ hex and formatting escapes are left as they are.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Er7Message:
    field_sep: str
    component_sep: str
    repetition_sep: str
    escape: str
    subcomponent_sep: str
    segments: list[list[str]]  # each segment: [name, field 1, field 2, ...] as raw text

    @classmethod
    def parse(cls, text: str) -> "Er7Message":
        lines = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
        if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
            raise ValueError("not an HL7 v2 message: it does not start with an MSH segment")
        field_sep = lines[0][3]
        encoding = lines[0][4:8]
        component, repetition, escape, sub = (list(encoding) + ["^", "~", "\\", "&"][len(encoding):])[:4]
        segments = []
        for line in lines:
            parts = line.split(field_sep)
            if parts[0] == "MSH":
                # MSH-1 is the field separator itself; MSH-2 the encoding characters.
                parts = ["MSH", field_sep, *parts[1:]]
            segments.append(parts)
        return cls(field_sep, component, repetition, escape, sub, segments)

    def segment(self, name: str, occurrence: int = 0) -> list[str] | None:
        found = [s for s in self.segments if s[0] == name]
        return found[occurrence] if len(found) > occurrence else None

    def has(self, name: str) -> bool:
        return self.segment(name) is not None

    def get(self, name: str, field: int, component: int = 1, repetition: int = 1, occurrence: int = 0) -> str:
        """One component's unescaped value ('' when absent); `component=0` gives the whole field."""
        seg = self.segment(name, occurrence)
        if seg is None or len(seg) <= field:
            return ""
        raw = seg[field]
        if name == "MSH" and field in (1, 2):
            return raw
        reps = raw.split(self.repetition_sep)
        if len(reps) < repetition:
            return ""
        value = reps[repetition - 1]
        if component:
            comps = value.split(self.component_sep)
            value = comps[component - 1] if len(comps) >= component else ""
        return self.unescape(value)

    def unescape(self, text: str) -> str:
        names = {"F": self.field_sep, "S": self.component_sep, "R": self.repetition_sep,
                 "E": self.escape, "T": self.subcomponent_sep}
        out, i = [], 0
        while i < len(text):
            if text[i] == self.escape:
                end = text.find(self.escape, i + 1)
                if end > i + 1 and text[i + 1 : end] in names:
                    out.append(names[text[i + 1 : end]])
                    i = end + 1
                    continue
            out.append(text[i])
            i += 1
        return "".join(out)

    @property
    def message_type(self) -> tuple[str, str]:
        return self.get("MSH", 9, 1), self.get("MSH", 9, 2)

    @property
    def control_id(self) -> str:
        return self.get("MSH", 10)

    @property
    def version(self) -> str:
        return self.get("MSH", 12, 1)


def escape(text: str, field_sep: str = "|", encoding: str = "^~\\&") -> str:
    """HL7 v2 escaping of the delimiter characters in a text value."""
    component, repetition, esc, sub = encoding
    out = []
    for ch in text:
        if ch == esc:
            out.append(f"{esc}E{esc}")
        elif ch == field_sep:
            out.append(f"{esc}F{esc}")
        elif ch == component:
            out.append(f"{esc}S{esc}")
        elif ch == repetition:
            out.append(f"{esc}R{esc}")
        elif ch == sub:
            out.append(f"{esc}T{esc}")
        elif ch in "\r\n":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)
