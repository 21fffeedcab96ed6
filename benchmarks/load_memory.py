"""Peak host memory while loading a single-file checkpoint: our reader against safetensors' safe_open.

    python benchmarks/load_memory.py [--hidden 1024 --layers 12]

Writes a random checkpoint of the official layout (bf16), repacks it as one .safetensors file with
`hidream convert`, then loads it in a fresh process for each way and reports the growth of peak RSS
(VmHWM) over the RSS before loading, as a multiple of the file's size, with every weight touched after
(so that mapped file pages count). Loaded in the file's dtype (bf16) the weights alone are 1.0x; in
float32 they are 2.0x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import transformers.models.qwen3_vl.modeling_qwen3_vl  # imported when the model is built
    from hidream.engine.checkpoint import load_model, open_checkpoint

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    path, way, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    ckpt = open_checkpoint(path)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    if way == "ours":
        tensors = list(load_model(ckpt, torch.device("cpu"), dtype).state_dict().values())
    else:  # the plain way: safe_open, every tensor into a state dict, in the asked dtype
        from safetensors import safe_open
        f = safe_open(path, "pt")
        tensors = [f.get_tensor(k).to(dtype) for k in f.keys()]
    total = sum(float(t.float().sum()) for t in tensors)  # every weight touched: mapped pages count too
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    from hidream.convert import convert
    from hidream.engine.demo import write_demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        directory = write_demo_checkpoint(Path(tmp) / "dir", hidden=args.hidden, layers=args.layers)
        file = convert(directory, Path(tmp) / "model.safetensors")
        size = file.stat().st_size
        print(f"single file: {size / 1e6:.0f} MB (hidden {args.hidden}, {args.layers} layers, bf16)\n")
        print("| loader | loaded as | peak RSS growth | x file size |")
        print("|---|---|---|---|")
        for way in ("ours", "safe_open"):
            for dtype in ("bfloat16", "float32"):
                run = subprocess.run([sys.executable, "-c", CHILD, str(file), way, dtype], capture_output=True,
                                     text=True, check=True)
                got = json.loads(run.stdout.strip().splitlines()[-1])
                grew = got["peak"] - got["before"]
                name = "hidream (readinto per tensor)" if way == "ours" else "safetensors safe_open + get_tensor"
                print(f"| {name} | {dtype} | {grew / 1e6:.0f} MB | {grew / size:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
