"""Accelerator specifications: one table for the trainer's MFU and for `mmlm compile`.

Per chip (a TPU chip counts both TensorCores of v4 / v5p; a GPU is one
device): peak dense bf16 FLOP/s and, where `mmlm compile` models the chip,
HBM capacity, HBM bandwidth and inter-chip interconnect (ICI) bandwidth, from
the vendors' public specifications. Figures not recorded are None.

A JAX device is matched by substrings of its lower-cased `device_kind`
(e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"), tried in table order, so a
longer name that contains a shorter one comes first (A100 before A10).
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """What a roofline needs of one chip, in SI units."""

    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One chip kind."""

    name: str  # e.g. "v5p", "h100"
    device_kinds: tuple[str, ...]  # substrings of a device's lower-cased `device_kind`
    peak_tflops: float  # dense bf16 TFLOP/s
    hbm_gib: float | None = None  # HBM capacity, GiB
    hbm_gbps: float | None = None  # HBM bandwidth, GB/s
    ici_gbps: float | None = None  # inter-chip interconnect bandwidth, GB/s

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def hbm_bytes(self) -> int:
        if self.hbm_gib is None:
            raise ValueError(f"no HBM capacity recorded for {self.name}")
        return int(self.hbm_gib * GIB)

    @property
    def chip(self) -> Chip:
        """The roofline's view of this chip (needs every bandwidth recorded)."""
        if self.hbm_gbps is None or self.ici_gbps is None:
            raise ValueError(f"no HBM / ICI bandwidth recorded for {self.name}")
        return Chip(peak_flops=self.peak_flops, hbm_bytes_per_s=self.hbm_gbps * 1e9,
                    ici_bytes_per_s=self.ici_gbps * 1e9)


# Table order is match order (see the module docstring).
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("v6e", ("v6 lite", "v6e"), 918.0, hbm_gib=32.0, hbm_gbps=1640.0, ici_gbps=448.0),
    Accelerator("v5p", ("v5p",), 459.0, hbm_gib=95.0, hbm_gbps=2765.0, ici_gbps=600.0),
    Accelerator("v5e", ("v5 lite", "v5e"), 197.0, hbm_gib=16.0, hbm_gbps=819.0, ici_gbps=200.0),
    Accelerator("v4", ("v4",), 275.0, hbm_gib=32.0, hbm_gbps=1228.0, ici_gbps=300.0),
    Accelerator("v3", ("v3",), 123.0),
    Accelerator("v2", ("v2",), 45.0),
    Accelerator("h200", ("h200",), 989.0),
    Accelerator("h100", ("h100",), 989.0),
    Accelerator("a100", ("a100",), 312.0),
    Accelerator("l4", ("l4",), 121.0),
    Accelerator("a10", ("a10",), 125.0),
    Accelerator("v100", ("v100",), 125.0),
    Accelerator("t4", ("t4",), 65.0),
)
BY_NAME: dict[str, Accelerator] = {a.name: a for a in ACCELERATORS}


def accelerator(name: str) -> Accelerator:
    """The table entry called `name` ("v5p", "h100", ...); KeyError for an unknown one."""
    return BY_NAME[name]


def for_device_kind(device_kind: str) -> Accelerator | None:
    """The table entry of a JAX device's `device_kind`, or None for a chip not in the table."""
    kind = device_kind.lower()
    for acc in ACCELERATORS:
        if any(key in kind for key in acc.device_kinds):
            return acc
    return None
