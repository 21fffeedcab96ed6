"""Which setting for which card: the dry run's memory table turned into docs/hardware.md's table.

    python benchmarks/hardware.py [--size 2048x2048]

One `hidream bench --dry-run --memory-table` of the full 8B configuration (estimates from fake
tensors), then per card size: the settings whose estimated peak fits with HEADROOM to spare (the CUDA
context, cuBLAS and attention workspaces, allocator slack), and each one's seconds-per-image floor at
the card's dense bf16 throughput and its PCIe link. The throughputs are the cards' published dense
bf16 tensor figures (no sparsity), assumed, not measured; a real run is slower than its floor.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

HEADROOM = 1.5e9


@dataclass(frozen=True)
class Card:
    gb: int
    example: str
    tflops: float  # dense bf16 tensor throughput (fp32 accumulate), published
    pcie_gbps: float  # host-to-device copies from pinned memory


CARDS = (
    Card(8, "RTX 4060, PCIe 4.0 x8", 30.0, 12.0),
    Card(12, "RTX 4070", 58.0, 25.0),
    Card(16, "RTX 4080", 97.0, 25.0),
    Card(24, "RTX 4090", 165.0, 25.0),
    Card(48, "L40S / RTX 6000 Ada", 360.0, 25.0),
    Card(80, "H100 SXM, PCIe 5.0", 990.0, 50.0),
)


def floor(row: dict, card: Card) -> float:
    step = row["flops_per_step"] / (card.tflops * 1e12)
    prefill = row["prefill_flops"] / (card.tflops * 1e12)
    if row["offload"] == "layers":
        copy = row["pass_bytes"] / (card.pcie_gbps * 1e9)
        step, prefill = max(step, copy), max(prefill, row["branches"] * copy)
    return row["steps"] * step + prefill


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2048x2048")
    args = ap.parse_args()
    from hidream.dry_run import memory_table, named_spec
    from hidream.sizes import resolve_size

    width, height = resolve_size(args.size, "--size")
    with tempfile.TemporaryDirectory() as tmp:
        spec, encoder = named_spec("full", Path(tmp))
        rows = memory_table(spec, encoder, variant="full", width=width, height=height, tflops=800.0, pcie_gbps=25.0)
    settings = sorted({(r["weights"], r["offload"]) for r in rows}, key=lambda s: (s[1] != "none", s[0] != "bf16"))
    by = {(r["weights"], r["offload"], r["mode"]): r for r in rows}
    modes = [m for m in dict.fromkeys(r["mode"] for r in rows)]
    print(f"estimated at {width}x{height}, full model (50 steps, guidance 5); floors in seconds per image "
          f"({' / '.join(modes)})\n")
    print("| card | example (dense bf16 TFLOP/s, PCIe GB/s) | settings that fit | floor s/image |")
    print("|---|---|---|---|")
    for card in CARDS:
        fits = [s for s in settings if all(by[(*s, m)]["peak_bytes"] + HEADROOM <= card.gb * 1e9 for m in modes)]
        names = [f"{w}" + (", --offload layers" if o == "layers" else "") for w, o in fits]
        floors = [" / ".join(f"{floor(by[(*s, m)], card):.0f}" for m in modes) for s in fits]
        print(f"| {card.gb} GB | {card.example} ({card.tflops:g}, {card.pcie_gbps:g}) | "
              f"{'<br>'.join(names) or 'none'} | {'<br>'.join(floors) or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
