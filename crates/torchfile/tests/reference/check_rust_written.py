"""Loads a Rust-written checkpoint with torch.load (weights_only, and mmap) and compares it with
the tagged JSON the Rust test expects. Also checks the zip layout: every record's data is 64-byte
aligned (offset read from the local header, whose extra field differs from the central one) and
every CRC is right. Exits non-zero on any mismatch."""
import json
import struct
import sys
import zipfile

import torch

from tagged import diff, encode

path, expected_path = sys.argv[1], sys.argv[2]
expected = json.load(open(expected_path))
errors = []

with zipfile.ZipFile(path) as z:
    bad = z.testzip()
    if bad is not None:
        errors.append(f"CRC mismatch in {bad}")
    names = [i.filename for i in z.infolist()]
    prefix = names[0].split("/")[0]
    want_names = [f"{prefix}/{n}" for n in ["data.pkl", ".format_version", ".storage_alignment", "byteorder"]]
    if names[:4] != want_names:
        errors.append(f"record order {names[:4]} != {want_names}")
    if names[-2:] != [f"{prefix}/version", f"{prefix}/.data/serialization_id"]:
        errors.append(f"last records {names[-2:]}")
    for n, want in [("byteorder", b"little"), (".format_version", b"1"), (".storage_alignment", b"64"), ("version", b"3\n")]:
        if z.read(f"{prefix}/{n}") != want:
            errors.append(f"{n} = {z.read(prefix + '/' + n)!r}")
    with open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            h = f.read(30)
            name_len, extra_len = struct.unpack("<HH", h[26:30])
            data_at = info.header_offset + 30 + name_len + extra_len
            if data_at % 64:
                errors.append(f"{info.filename}: data at {data_at}, not 64-byte aligned")
            if info.compress_type != zipfile.ZIP_STORED:
                errors.append(f"{info.filename}: compressed")
    if len(sys.argv) > 3 and sys.argv[3] == "zip64":
        raw = open(path, "rb").read()
        if b"PK\x06\x06" not in raw or b"PK\x06\x07" not in raw:
            errors.append("zip64 end records missing")
        if not all(i.extra.startswith(b"\x01\x00") for i in z.infolist()):
            errors.append("central entries lack the zip64 extra field")

for mode in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
    obj = torch.load(path, **mode)
    d = diff(encode(obj), expected)
    if d:
        errors.append(f"torch.load({mode}): {d}")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print("ok")
