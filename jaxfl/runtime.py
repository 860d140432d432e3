"""Process-level tuning for XLA:CPU (host devices, allocator), and peak memory for benchmarks."""

from __future__ import annotations

import ctypes
import functools
import glob
import mmap
import os
import resource
import sys

NO_TUNING_ENV = "JAXFL_NO_MALLOC_TUNING"
CPU_DEVICES_ENV = "JAXFL_CPU_DEVICES"
# What configure_cpu_devices decided, for the run log (it runs before logging is set up).
cpu_device_choice = "not configured by jaxfl"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_cpu_devices() -> int | None:
    """Expose one XLA:CPU device per usable core, so ``auto`` shards clients over all of them.

    XLA:CPU runs one device's program on about one core plus a shared intra-op pool (measured
    113-177% CPU for DPResNet on 2 cores); with one device per core, ``shard_map`` keeps every
    core busy (196%, 0.89 vs 1.05 s per DPResNet step). Runs at ``import jaxfl``; it must come
    before JAX starts its backends, and it leaves the count alone when the user chose one
    (``JAX_NUM_CPU_DEVICES``, ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or
    ``jax.config.update("jax_num_cpu_devices", n)``). ``JAXFL_CPU_DEVICES=n`` picks ``n``
    (``1``: a single device, as plain JAX). Accelerators are unaffected: only the CPU backend
    reads this setting. Returns the count it set, or None.
    """
    global cpu_device_choice
    import jax

    user_flags = os.environ.get("XLA_FLAGS", "")
    if (
        "xla_force_host_platform_device_count" in user_flags
        or os.environ.get("JAX_NUM_CPU_DEVICES")
        or jax.config.jax_num_cpu_devices != -1
    ):
        cpu_device_choice = "set by the user (JAX/XLA settings)"
        return None
    requested = os.environ.get(CPU_DEVICES_ENV)
    try:
        count = int(requested) if requested else usable_cores()
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"{CPU_DEVICES_ENV}={requested!r} must be a positive number of CPU devices "
            "(1 for a single device)."
        )
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # JAX already ran an operation: its device count is fixed now
        cpu_device_choice = "left as JAX had it (JAX was in use before jaxfl was imported)"
        return None
    source = f"{CPU_DEVICES_ENV}={requested}" if requested else "one per usable core"
    cpu_device_choice = f"{count} devices ({source}; {CPU_DEVICES_ENV}=1 for one)"
    return count


# XLA:CPU aborts the whole process when a device waits more than 40 s (its default) for the
# others at a collective, and warns after 20 s. Under shard_map one device's clients can take
# minutes longer than another's (a large client, 3D volumes): measured, a 3D MedMNIST round of
# jaxfl's previous code died with "Termination timeout ... of 40 seconds exceeded". Waiting is
# correct here, so jaxfl raises both limits unless the user set them.
COLLECTIVE_FLAGS = {
    "xla_cpu_collective_call_terminate_timeout_seconds": 7 * 24 * 3600,
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 600,
}


def _append_xla_flags(*flags: str) -> None:
    """Append ``flags`` to ``XLA_FLAGS``, which XLA reads once, when JAX starts its backends."""
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def configure_collective_timeouts() -> list[str]:
    """Append :data:`COLLECTIVE_FLAGS` to ``XLA_FLAGS`` (those the user has not set); returns the
    flags added. Must run before JAX starts its CPU backend (it runs at ``import jaxfl``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in COLLECTIVE_FLAGS.items() if k not in flags]
    _append_xla_flags(*added)
    return added


# XLA:CPU (jaxlib 0.10.2) hands convolutions to YNNPACK by default. Measured on a 2-core Xeon
# with AVX-512 and AMX: YNNPACK's kernel-gradient convolutions run at 40-90 GFLOP/s, XLA's own
# Eigen convolutions at 100-180, and a DPResNet training step (batch 32) takes 1.9-2.1 s with
# YNNPACK convolutions and 0.95-0.98 s without (UNet 0.18 -> 0.16 s, SmallCNN unchanged).
# Dots, elementwise ops and reductions stay on YNNPACK.
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_CONV_FLAG = f"--{YNN_FUSION_FLAG}=-individual_convolution"
KEEP_YNN_CONV_ENV = "JAXFL_YNN_CONVOLUTIONS"
# What configure_cpu_convolutions decided, for the run log.
cpu_convolution_choice = "not configured by jaxfl"


def _jaxlib_knows(*names: bytes) -> bool:
    """Whether the installed jaxlib's XLA binary contains every string in ``names``.

    XLA aborts the process on an unknown flag or fusion type in ``XLA_FLAGS``, so a flag that
    only some jaxlib versions define is set only after this check finds its name compiled in.
    """
    import jaxlib

    for path in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")):
        if os.path.getsize(path) < (1 << 24):  # the loader stubs; XLA itself is hundreds of MB
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if all(m.find(name) >= 0 for name in names):
                return True
    return False


def _backends_started() -> bool:
    """Whether JAX has started its backends (``XLA_FLAGS`` is read then, never again)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another JAX layout: assume not, as before
        return False


def configure_cpu_convolutions() -> bool:
    """Keep XLA:CPU's convolutions off YNNPACK (see :data:`YNN_CONV_FLAG`); returns whether set.

    Runs at ``import jaxfl``, before JAX starts its CPU backend. It leaves ``XLA_FLAGS`` alone
    when the user set ``xla_cpu_experimental_ynn_fusion_type`` there, when
    ``JAXFL_YNN_CONVOLUTIONS=1`` asks for XLA's default, or when the installed jaxlib has no
    such flag or fusion type. Accelerators never read it.
    """
    global cpu_convolution_choice
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        cpu_convolution_choice = "YNNPACK fusion types set by the user (XLA_FLAGS)"
        return False
    if os.environ.get(KEEP_YNN_CONV_ENV) == "1":
        cpu_convolution_choice = f"XLA's default ({KEEP_YNN_CONV_ENV}=1)"
        return False
    if _backends_started():
        cpu_convolution_choice = "left as XLA had it (JAX was in use before jaxfl was imported)"
        return False
    if not _jaxlib_knows(YNN_FUSION_FLAG.encode(), b"INDIVIDUAL_CONVOLUTION"):
        cpu_convolution_choice = "XLA's default (this jaxlib has no YNNPACK convolutions)"
        return False
    _append_xla_flags(YNN_CONV_FLAG)
    cpu_convolution_choice = (
        f"XLA's own convolutions, not YNNPACK's ({KEEP_YNN_CONV_ENV}=1 for XLA's default)"
    )
    return True


@functools.cache
def tune_cpu_malloc() -> bool:
    """Keep freed heap blocks up to 32 MiB and never trim the heap (Linux/glibc; once per process).

    By default glibc hands large freed blocks back to the OS, so every jitted call on XLA:CPU
    page-faults its temp buffers (~18 MiB for SmallCNN, batch 16) back in: measured 1.9M minor
    faults and 4 s of system time for 6 rounds of 64 clients, ~1.6x slower per-client steps.
    Costs ~80 MiB of extra resident memory. Set ``JAXFL_NO_MALLOC_TUNING=1`` to skip it.
    Returns whether the settings were applied.
    """
    if os.environ.get(NO_TUNING_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
