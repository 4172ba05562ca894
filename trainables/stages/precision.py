"""Numeric precision and memory layout of training: what the device runs natively, resolved once per study.

`resolve_precision("auto", device)` is "bf16" where the hardware has native bfloat16 arithmetic -- CUDA compute
capability 8.0+ (Ampere and later), or a CPU with AVX512_BF16 or AMX -- and "fp32" elsewhere (bfloat16 autocast
on a CPU without it is emulated and many times slower). "fp32" and "bf16" are taken as given.

The resolved precision enters every stage's key (bf16 and fp32 weights are different results); the layout does not
(channels-last changes speed, not what is computed, up to float rounding order). `resolve_channels_last("auto", ...)`
picks channels-last (NHWC) where bench/throughput.py measured it faster for these models: on CUDA and on x86 CPUs
(oneDNN's convolutions are NHWC-native), in both precisions.
`torch_threads(n)` sets the other thing that changes float rounding order, the thread count, for a block (a run in
one process that must equal a Train worker's bit for bit).
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch

PRECISIONS = ("auto", "fp32", "bf16")
RESOLVED = ("fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` runs bfloat16 arithmetic natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    return False


def resolve_precision(requested: str, device: str | torch.device) -> str:
    """"auto" -> "bf16" where `device` runs it natively, else "fp32"; "fp32" / "bf16" unchanged."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    return "bf16" if native_bf16(device) else "fp32"


def resolve_channels_last(requested: bool | str, device: str | torch.device) -> bool:
    """"auto" -> channels-last on CUDA and x86 CPUs (measured faster, bench/throughput.py); True / False as given."""
    if requested != "auto":
        return bool(requested)
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64"))


def autocast(precision: str, device: str | torch.device):
    """The autocast context of a resolved precision (disabled for fp32)."""
    if precision not in RESOLVED:
        raise ValueError(f"precision {precision!r} is not resolved (expected one of {', '.join(RESOLVED)})")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def describe_device(device: str | torch.device) -> str:
    """A short name of the hardware a precision was resolved for (recorded beside it)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    native = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    return f"cpu {platform.machine()} ({', '.join(native) if native else 'no native bf16'})"


@contextlib.contextmanager
def torch_threads(n: int):
    """Compute with `n` threads inside, torch's count restored after. A run in this process that must equal a Train
    worker's bit for bit uses the worker's count: another count sums in another order."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
