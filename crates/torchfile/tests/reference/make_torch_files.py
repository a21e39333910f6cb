"""Writes checkpoints with torch.save (the kinds of values training saves contain) into OUTDIR,
each NAME.pt next to NAME.json: the tagged encoding of what torch.load gives back."""
import argparse
import collections
import json
import os
import random
import sys

import torch

from tagged import encode

try:
    import numpy as np
except ImportError:
    np = None

out = sys.argv[1]
torch.manual_seed(0)
random.seed(0)


def save(name, obj, **kw):
    path = os.path.join(out, name + ".pt")
    torch.save(obj, path, **kw)
    loaded = torch.load(path, weights_only=False)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(encode(loaded), f)


model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(2, 4)).sum().backward()
opt.step()

base = torch.arange(20, dtype=torch.float32)
sd = model.state_dict()  # keeps its _metadata: pickled as OrderedDict + BUILD, as Megatron saves it
sd["bf16"] = torch.randn(3, 5).to(torch.bfloat16)
sd["f16"] = torch.randn(4).half()
sd["f64"] = torch.randn(2, 2, dtype=torch.float64)
sd["i64"] = torch.tensor([-1, 2**40, 7])
sd["i32"] = torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)
sd["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
sd["i8"] = torch.tensor([-5, 5], dtype=torch.int8)
sd["u8"] = torch.tensor([0, 255], dtype=torch.uint8)
sd["bool"] = torch.tensor([True, False, True])
sd["empty"] = torch.zeros(0, 3)
sd["scalar"] = torch.tensor(2.5)
sd["view_a"] = base[5:10]
sd["view_b"] = base[12:]
sd["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
sd["strided"] = torch.arange(30, dtype=torch.int64).reshape(5, 6)[1:4, ::2]

args = argparse.Namespace(lr=0.1, name="internvl", params_dtype=torch.bfloat16, layers=[1, 2], tp=None)
rng = {"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}
if np is not None:
    np.random.seed(0)
    rng["np_rng_state"] = np.random.get_state()

save(
    "megatron_like",
    {
        "model": sd,
        "checkpoint_version": 3.0,
        "iteration": 1000,
        "args": args,
        "optimizer": opt.state_dict(),
        "rng_state": [rng],
        "misc": {"neg": -7, "big": 2**62, "none": None, "t": True, "f": False, "s": "héllo", "list": [1, 2.5, "x"], "tup": (1, 2, 3, 4, 5)},
    },
)
save("protocol4", {"model": sd, "bytes": b"\x00abc\xff", "frozen": (1, "two")}, pickle_protocol=4)
save("many", {"model": collections.OrderedDict((f"layer.{i}.weight", torch.full((2,), float(i))) for i in range(300))})
print("ok")
