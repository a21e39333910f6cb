"""Tagged-JSON encoding of loaded checkpoint values, mirrored by tests/common/mod.rs::encode."""
import argparse
import collections

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional
    np = None


def encode(x):
    if x is None:
        return {"t": "none"}
    if isinstance(x, bool):
        return {"t": "bool", "v": x}
    if isinstance(x, int):
        return {"t": "int", "v": x}
    if isinstance(x, float):
        return {"t": "float", "v": x}
    if isinstance(x, str):
        return {"t": "str", "v": x}
    if isinstance(x, bytes):
        return {"t": "bytes", "hex": x.hex()}
    if isinstance(x, list):
        return {"t": "list", "items": [encode(i) for i in x]}
    if isinstance(x, tuple):
        return {"t": "tuple", "items": [encode(i) for i in x]}
    if isinstance(x, collections.OrderedDict):
        return {"t": "odict", "items": [[encode(k), encode(v)] for k, v in x.items()]}
    if isinstance(x, dict):
        return {"t": "dict", "items": [[encode(k), encode(v)] for k, v in x.items()]}
    if isinstance(x, torch.dtype):
        return {"t": "global", "v": str(x)}
    if isinstance(x, torch.Tensor):
        flat = x.detach().contiguous().reshape(-1).view(torch.uint8)
        return {
            "t": "tensor",
            "dtype": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "stride": list(x.stride()),
            "offset": x.storage_offset(),
            "hex": bytes(flat.numpy().tobytes()).hex(),
        }
    if isinstance(x, argparse.Namespace):
        return {"t": "object", "class": "argparse.Namespace", "args": [], "state": encode(dict(vars(x)))}
    if np is not None and isinstance(x, np.ndarray):
        return {"t": "ndarray", "shape": list(x.shape), "hex": x.tobytes().hex()}
    raise TypeError(f"no tagged encoding for {type(x)}")


def diff(got, want, path="$"):
    """First difference as a string, or None."""
    if type(got) is not type(want):
        return f"{path}: {got!r} != {want!r}"
    if isinstance(got, dict):
        for k in sorted(set(got) | set(want)):
            if k not in got or k not in want:
                return f"{path}: key {k} only on one side"
            d = diff(got[k], want[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(got, list):
        if len(got) != len(want):
            return f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            d = diff(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if got == want else f"{path}: {got!r} != {want!r}"
