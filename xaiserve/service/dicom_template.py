"""Result templates keyed by the structure of the source header, never by its values.

highdicom spends most of an encoding on work that depends on which attributes the source header
has, not on their values: checking modules against the IOD tables, building functional groups and
references, pydicom writing ~150 nested elements (cProfile of a 512 x 512 SEG: ~85 %). So a result
kind (SEG / Parametric Map, algorithm, map labels, frame size) is built ONCE per header structure,
from stand-in headers, and every later source of that structure is spliced into it.

How a template is made, and why it cannot carry one patient's data into another's object:

1. Stand-ins. The source's frame view is copied twice (A and B) with every value that can name a
   patient, a study, an instance or a place replaced by a sentinel: every text element (PN, LO, SH,
   UI, DA, TM, DT, AS, DS, IS, LT, ST, UT, UC, UR, AE), value by value, and every binary number
   (US, SS, UL, SL, FL, FD) except the Image Pixel module's layout. Sentinels are distinct per element
   and per value, and differ between A and B. What stays verbatim (Code Strings, registered DICOM
   UIDs such as the SOP Class, the pixel layout, the orientation) is part of the cache KEY, together
   with the shape of the header (tags, VRs, value multiplicities, empty values, sequence items), so
   two sources share a template only when everything kept verbatim is equal in both.
2. Two builds. highdicom builds the object from A and from B (placeholder pixels).
3. Differential compile. Both encodings are parsed (Explicit VR Little Endian) and walked in
   parallel. An element whose value is a sentinel (or a sequence of sentinels and fixed text) in A
   and the SAME sentinels in B becomes a slot: "the source's value of element k", encoded per call.
   The per-result elements (instance / series UIDs, dates and times, pixel data, a Parametric Map's
   value ranges and window) are slots by tag. Every other element must be byte-identical in A and
   B; if one is not, highdicom computed it from a value (not copied it), so the structure is marked
   not templatable and every call builds with highdicom as before. No value of any real source
   ever enters a template: what is not a slot was built from stand-ins.
4. Rendering. The source's values are encoded with pydicom (its character set), spliced into the
   slots, and the sequence and item lengths recomputed.

Tests (tests/test_dicom_templates.py) build results for PHI-laden files sharing a structure and
compare them, element by element, with what highdicom builds from each file uncached, and check that
no value of one file appears in the bytes of the other's result.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

TEXT_VRS = {"AE", "AS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
SINGLE_VALUED = {"LT", "ST", "UT", "UR"}  # a backslash is text in these
NUMBER_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
KEEP = {  # kept verbatim (and so part of the key) although text / numbers: what decides the layout
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "ImageOrientationPatient",
    "ImageOrientationSlide",
}
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
GROUP_LENGTH = 0x00020000
DIMENSION_ORGANIZATION_UID = 0x00209164  # made up by highdicom per build: the template's own (A's)
TEMPLATES = 64
_templates: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


class NotTemplatable(Exception):
    """The two stand-in builds differ outside the slots: highdicom computed something from a value."""


# -- stand-ins -------------------------------------------------------------------------------------
def _sentinel(vr: str, s: int, n: int) -> Any:
    """A value of `vr` that no header holds, distinct for (stand-in s, counter n)."""
    if vr == "UI":
        return f"2.25.{s}0{n:05d}9"
    if vr == "DA":
        return (datetime.date(1900 + 10 * s, 1, 1) + datetime.timedelta(days=n)).strftime("%Y%m%d")
    if vr == "TM":
        return f"{10 + s:02d}{n // 60 % 60:02d}{n % 60:02d}.{s}{n:05d}"
    if vr == "DT":
        return _sentinel("DA", s, n) + _sentinel("TM", s, n)
    if vr == "AS":
        return f"{(100 * s + n) % 1000:03d}D"
    if vr == "DS":
        return f"{s}0{n:04d}.25"
    if vr == "IS":
        return f"{s}1{n:04d}"
    if vr == "PN":
        return f"Zq{s}x^N{n:05d}"
    if vr in NUMBER_VRS:
        return {"US": 20000, "SS": 10000, "UL": 3000000, "SL": 3000000}.get(vr, 30000.5) + 1000 * s + n
    return f"ZQ{s}X{n:05d}"


def _registered(value: str) -> bool:
    return value.startswith("1.2.840.10008.")  # a DICOM-defined UID (SOP Class, transfer syntax, coding ...)


@dataclass
class StandIns:
    a: Any  # Dataset
    b: Any
    key: str  # digest of the header's structure and of everything kept verbatim
    paths: list[tuple]  # sentinel n -> (element path, value index) in the source header
    sentinels: tuple[dict[bytes, int], dict[bytes, int]]  # encoded sentinel -> n, for A and B
    binary: tuple[dict[bytes, int], dict[bytes, int]]  # packed binary sentinel -> n


def stand_ins(header, extra: tuple[str, ...], copies: bool = True) -> StandIns:
    """Stand-ins A and B of `header` (see the module docstring); `extra` names further sentinel
    integers the caller puts in (the frame number), numbered after the header's. copies=False:
    only the key and the sentinels' paths (what a call needs to find and fill its template)."""
    import copy as _copy

    from pydicom.dataset import Dataset
    from pydicom.multival import MultiValue

    shape: list = []
    paths: list[tuple] = []
    sent: tuple[dict, dict] = ({}, {})
    binary: tuple[dict, dict] = ({}, {})

    def copy(ds, path: tuple) -> tuple[Any, Any]:
        out_a, out_b = Dataset(), Dataset()
        for elem in ds:
            if elem.tag.is_private:
                continue
            vr, kw, tag = elem.VR, elem.keyword, int(elem.tag)
            if vr == "SQ":
                items = list(elem.value or ())
                shape.append((tag, "SQ", len(items)))
                pairs = [copy(item, path + ((tag, i),)) for i, item in enumerate(items)]
                if copies:
                    out_a.add_new(tag, "SQ", [p[0] for p in pairs])
                    out_b.add_new(tag, "SQ", [p[1] for p in pairs])
                continue
            value = elem.value
            values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
            empty = value is None or value == "" or (isinstance(value, (list, tuple, MultiValue)) and not values)
            variable = not empty and kw not in KEEP and (vr in TEXT_VRS or (vr in NUMBER_VRS and len(values) == 1))
            if variable and vr == "UI" and all(_registered(str(v)) for v in values):
                variable = False
            if not variable:
                kept = value if isinstance(value, bytes) else repr(value).encode()
                shape.append((tag, vr, hashlib.blake2b(kept, digest_size=16).hexdigest()))
                if copies:
                    out_a.add(_copy.deepcopy(elem))
                    out_b.add(_copy.deepcopy(elem))
                continue
            shape.append((tag, vr, len(values)))
            va: list = []
            vb: list = []
            for i in range(len(values)):
                n = len(paths)
                paths.append((path + ((tag, None),), i if vr not in SINGLE_VALUED else None))
                if not copies:
                    continue
                for s, (v_out, d) in enumerate(((va, sent[0]), (vb, sent[1])), start=1):
                    v = _sentinel(vr, s, n)
                    v_out.append(v)
                    if vr in NUMBER_VRS:
                        binary[s - 1][struct.pack("<" + NUMBER_VRS[vr], v)] = n
                    else:
                        d[str(v).encode()] = n
            if copies:
                out_a.add_new(tag, vr, va if len(va) > 1 else va[0])
                out_b.add_new(tag, vr, vb if len(vb) > 1 else vb[0])
        return out_a, out_b

    a, b = copy(header, ())
    for name in extra:
        n = len(paths)
        paths.append(((name,), None))
        for s in (1, 2):
            sent[s - 1][str(_sentinel("IS", s, n)).encode()] = n
    key = hashlib.blake2b(repr(shape).encode(), digest_size=16).hexdigest()
    return StandIns(a, b, key, paths, sent, binary)


def extra_sentinel(si: StandIns, name: str, s: int) -> int:
    n = next(i for i, (p, _) in enumerate(si.paths) if p == (name,))
    return int(_sentinel("IS", s, n))


# -- parsing an encoded object ----------------------------------------------------------------------
@dataclass
class _Leaf:
    tag: int
    vr: str
    value: bytes


@dataclass
class _Seq:
    tag: int
    undefined: bool
    items: list  # of (undefined, [nodes])


def _parse(data: bytes, pos: int, end: int) -> tuple[list, int]:
    nodes: list = []
    while pos < end:
        g, e = struct.unpack_from("<HH", data, pos)
        tag = g << 16 | e
        if tag == ITEM_END:
            return nodes, pos + 8
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            head = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            head = 8
        if vr == b"SQ":
            undefined = length == 0xFFFFFFFF
            p = pos + head
            stop = len(data) if undefined else p + length
            items = []
            while p < stop:
                g, e = struct.unpack_from("<HH", data, p)
                (ilen,) = struct.unpack_from("<I", data, p + 4)
                if (g << 16 | e) == SEQ_END:
                    p += 8
                    break
                if ilen == 0xFFFFFFFF:
                    sub, p = _parse(data, p + 8, len(data))
                    items.append((True, sub))
                else:
                    sub, _ = _parse(data, p + 8, p + 8 + ilen)
                    items.append((False, sub))
                    p += 8 + ilen
            nodes.append(_Seq(tag, undefined, items))
            pos = p
            continue
        if length == 0xFFFFFFFF:
            raise NotTemplatable("encapsulated data")
        nodes.append(_Leaf(tag, vr.decode(), data[pos + head : pos + head + length]))
        pos += head + length
    return nodes, pos


# -- compiling -------------------------------------------------------------------------------------
@dataclass
class Slot:
    tag: int
    vr: str
    parts: tuple  # bytes and sentinel numbers (source values), or () for a per-result slot
    result: str = ""  # the per-result value's name ("" = a source value)
    index: int = 0  # which map, for per-map per-result values


@dataclass
class Seq:
    tag: int
    undefined: bool
    items: list  # of (undefined, [pieces])


def _pattern(value: bytes, vr: str, found: dict[bytes, int], rx) -> tuple:
    v = value
    if v and v[-1:] in (b" ", b"\0"):
        v = v[:-1]
    if rx is None:
        return (v,)
    parts: list = []
    pos = 0
    for m in rx.finditer(v):
        if m.start() > pos:
            parts.append(v[pos : m.start()])
        parts.append(found[m.group(0)])
        pos = m.end()
    if pos < len(v):
        parts.append(v[pos:])
    return tuple(parts)


def _regex(found: dict[bytes, int]):
    if not found:
        return None
    alts = b"|".join(re.escape(k) for k in sorted(found, key=len, reverse=True))
    return re.compile(rb"(?<![0-9A-Za-z.])(?:" + alts + rb")(?![0-9A-Za-z])")


def compile_template(
    data_a: bytes, data_b: bytes, si: StandIns, per_result: Callable[[int, tuple], tuple[str, int] | None]
) -> Template:
    """The template of two stand-in builds (see the module docstring); NotTemplatable when they
    differ outside the slots. `per_result(tag, path)` names a per-result slot: (name, index) or None."""
    for d in (data_a, data_b):
        if d[128:132] != b"DICM":
            raise NotTemplatable("not a Part 10 file")
    ta, _ = _parse(data_a, 132, len(data_a))
    tb, _ = _parse(data_b, 132, len(data_b))
    rx = (_regex(si.sentinels[0]), _regex(si.sentinels[1]))

    def walk(xa: list, xb: list, path: tuple) -> list:
        if len(xa) != len(xb):
            raise NotTemplatable("element count")
        out: list = []
        for x, y in zip(xa, xb):
            if type(x) is not type(y) or x.tag != y.tag:
                raise NotTemplatable(f"element {x.tag:08x}")
            if isinstance(x, _Seq):
                if len(x.items) != len(y.items) or x.undefined != y.undefined:
                    raise NotTemplatable(f"sequence {x.tag:08x}")
                items = [
                    (ua, walk(na, nb, path + ((x.tag, i),)))
                    for i, ((ua, na), (_, nb)) in enumerate(zip(x.items, y.items))
                ]
                out.append(Seq(x.tag, x.undefined, items))
                continue
            res = per_result(x.tag, path)
            if res is not None:
                out.append(Slot(x.tag, x.vr, (), res[0], res[1]))
                continue
            if x.tag == DIMENSION_ORGANIZATION_UID or x.tag == GROUP_LENGTH:
                out.append(x)
                continue
            if x.vr in NUMBER_VRS:
                na, nb = si.binary[0].get(x.value), si.binary[1].get(y.value)
                if na is not None or nb is not None:
                    if na != nb:
                        raise NotTemplatable(f"element {x.tag:08x}")
                    out.append(Slot(x.tag, x.vr, (na,)))
                    continue
            elif x.vr in TEXT_VRS:
                pa = _pattern(x.value, x.vr, si.sentinels[0], rx[0])
                pb = _pattern(y.value, y.vr, si.sentinels[1], rx[1])
                if any(isinstance(p, int) for p in pa + pb):
                    if pa != pb:
                        raise NotTemplatable(f"element {x.tag:08x}")
                    out.append(Slot(x.tag, x.vr, pa))
                    continue
            if x.value != y.value or x.vr != y.vr:
                raise NotTemplatable(f"element {x.tag:08x} differs")
            out.append(x)
        return out

    nodes = walk(ta, tb, ())
    meta = [n for n in nodes if n.tag >> 16 == 2]
    body = [n for n in nodes if n.tag >> 16 != 2]
    return Template(_merge(meta), _merge(body), si.paths)


def _leaf_bytes(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode())
    if vr.encode() in LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _merge(nodes: list) -> list:
    """Pieces: static runs as one bytes object, slots and the sequences that hold slots as nodes."""
    out: list = []
    for n in nodes:
        if isinstance(n, _Leaf):
            piece: Any = b"" if n.tag == GROUP_LENGTH else _leaf_bytes(n.tag, n.vr, n.value)
        elif isinstance(n, Seq):
            items = [(u, _merge(p)) for u, p in n.items]
            piece = Seq(n.tag, n.undefined, items)
            if all(all(isinstance(q, bytes) for q in p) for _, p in items):
                piece = _render_seq(piece, None)
        else:
            piece = n
        if isinstance(piece, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += piece
        elif piece != b"":
            out.append(piece)
    return out


def _render(pieces: list, values) -> bytes:
    return b"".join(
        p if isinstance(p, bytes) else values(p) if isinstance(p, Slot) else _render_seq(p, values) for p in pieces
    )


def _render_seq(seq: Seq, values) -> bytes:
    body = []
    for undefined, pieces in seq.items:
        content = _render(pieces, values)
        if undefined:
            body.append(
                struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            )
        else:
            body.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content)
    content = b"".join(body)
    head = struct.pack("<HH2sH", seq.tag >> 16, seq.tag & 0xFFFF, b"SQ", 0)
    if seq.undefined:
        return head + struct.pack("<I", 0xFFFFFFFF) + content + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return head + struct.pack("<I", len(content)) + content


class Template:
    def __init__(self, meta: list, body: list, paths: list[tuple]):
        self.meta, self.body, self.paths = meta, body, paths

    def render(self, source_values: list, result: Callable[[Slot], bytes]) -> bytes:
        def value(slot: Slot) -> bytes:
            if slot.result:
                return result(slot)
            raw = b"".join(p if isinstance(p, bytes) else source_values[p] for p in slot.parts)
            return _leaf_bytes(slot.tag, slot.vr, raw)

        meta = _render(self.meta, value)
        group = _leaf_bytes(GROUP_LENGTH, "UL", struct.pack("<I", len(meta)))
        return b"\0" * 128 + b"DICM" + group + meta + _render(self.body, value)


# -- a source's values ------------------------------------------------------------------------------
def source_values(header, paths: list[tuple], extra: dict[str, int]) -> list[bytes] | None:
    """The encoded value of each sentinel's element of `header` (its character set); None when a
    value cannot be spliced as highdicom would write it (a DS pydicom would reformat)."""
    from pydicom.charset import convert_encodings
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element
    from pydicom.valuerep import is_valid_ds

    encodings = convert_encodings(header.get("SpecificCharacterSet"))
    cache: dict[tuple, list[bytes]] = {}
    out: list[bytes] = []
    for path, index in paths:
        if len(path) == 1 and isinstance(path[0], str):
            out.append(str(int(extra[path[0]])).encode())
            continue
        vals = cache.get(path)
        if vals is None:
            ds = header
            for tag, i in path[:-1]:
                ds = ds[tag].value[i]
            elem = ds[path[-1][0]]
            if elem.VR == "DS" and any(not is_valid_ds(str(v)) for v in (elem.value if elem.VM > 1 else [elem.value])):
                return None
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, elem, encodings)
            raw = fp.getvalue()
            raw = raw[12:] if raw[4:6] in LONG_VRS else raw[8:]
            if elem.VR in NUMBER_VRS:
                size = struct.calcsize("<" + NUMBER_VRS[elem.VR])
                vals = [raw[k : k + size] for k in range(0, len(raw), size)]
            else:
                if raw and raw[-1:] in (b" ", b"\0"):
                    raw = raw[:-1]
                vals = [raw] if elem.VR in SINGLE_VALUED else raw.split(b"\\")
            cache[path] = vals
        if index is None:
            out.append(vals[0] if len(vals) == 1 else b"\\".join(vals))
        elif index >= len(vals):
            return None
        else:
            out.append(vals[index])
    return out


def cached(key: tuple, build: Callable[[], Template | None]) -> Template | None:
    """The template of `key`, built on a miss (None: the structure is not templatable, remembered)."""
    with _lock:
        if key in _templates:
            _templates.move_to_end(key)
            return _templates[key]
    t = build()  # outside the lock: two threads may build the same one, harmlessly
    with _lock:
        _templates[key] = t
        while len(_templates) > TEMPLATES:
            _templates.popitem(last=False)
    return t


def clear() -> None:
    with _lock:
        _templates.clear()
