"""NVML sampling (nvidia-ml-py) in a background thread while the model runs.

Samples GPU utilization, memory used, power and SM clock every `interval_s`; energy comes from
the driver's cumulative energy counter (Volta and newer) or, where that is missing, from power
integrated over the samples. Without a GPU, a driver or the package, `NvmlSampler` does
nothing and its summary says why in one line; it never raises.
"""

from __future__ import annotations

import importlib
import threading
import time
from types import ModuleType, TracebackType
from typing import Any

import torch

from optimize.profile.records import NvmlSummary


def _pynvml() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("pynvml"), ""
    except ImportError:
        return None, "NVML not sampled: nvidia-ml-py is not installed (pip install nvidia-ml-py)"


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.decode() if isinstance(text, bytes) else text


def _handle(nvml: ModuleType, device: torch.device) -> Any:
    """The NVML handle of torch's `device`, matched by PCI bus id (CUDA_VISIBLE_DEVICES may
    renumber devices), falling back to the same index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        props = torch.cuda.get_device_properties(index)
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except Exception:  # older torch without PCI fields, or an NVML that does not know the id
        return nvml.nvmlDeviceGetHandleByIndex(index)


class NvmlSampler:
    """Context manager sampling NVML counters of `device` while its body runs.

    `summary(inferences)` afterwards gives means and extremes and the energy per inference.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.reason = ""
        self._nvml: ModuleType | None = None
        self._handle: Any = None
        self._samples: list[tuple[float, float | None, int | None, float | None, float | None]] = []
        self._energy: tuple[float | None, float | None] = (None, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t: tuple[float, float] = (0.0, 0.0)
        self._name = ""
        if self.device.type != "cuda":
            self.reason = f"NVML not sampled: the model runs on {self.device.type}, not on an NVIDIA GPU"
            nvml, missing = _pynvml()
            if nvml is None:
                self.reason = missing
            return
        nvml, self.reason = _pynvml()
        if nvml is None:
            return
        try:
            nvml.nvmlInit()
            self._handle = _handle(nvml, self.device)
            name = nvml.nvmlDeviceGetName(self._handle)
            self._name = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = nvml
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, NoPermission, ...
            self.reason = f"NVML not sampled: no usable NVIDIA driver ({_error_text(exc)})"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _energy_mj(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))  # type: ignore[union-attr]
        except Exception:  # pre-Volta GPUs have no energy counter
            return None

    def _sample(self) -> None:
        nvml, h = self._nvml, self._handle
        assert nvml is not None

        def read(fn: Any) -> Any:
            try:
                return fn()
            except Exception:  # a counter a GPU does not support is left out, not fatal
                return None

        util = read(lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))
        mem = read(lambda: int(nvml.nvmlDeviceGetMemoryInfo(h).used))
        power = read(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1e3)  # mW → W
        clock = read(lambda: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)))
        self._samples.append((time.perf_counter(), util, mem, power, clock))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> NvmlSampler:
        if self.available:
            self._energy = (self._energy_mj(), None)
            self._t = (time.perf_counter(), 0.0)
            self._thread = threading.Thread(target=self._loop, name="kiln-nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()  # one sample at the end, so even a very short run has two
        self._t = (self._t[0], time.perf_counter())
        self._energy = (self._energy[0], self._energy_mj())
        try:
            self._nvml.nvmlShutdown()  # type: ignore[union-attr]
        except Exception:  # shutting down a library that is going away anyway
            pass

    def summary(self, inferences: int) -> NvmlSummary:
        """Means and extremes of the samples, energy and energy per inference."""
        if not self.available:
            return NvmlSummary(available=False, reason=self.reason)
        duration = self._t[1] - self._t[0]

        def column(i: int) -> list[Any]:
            return [s[i] for s in self._samples if s[i] is not None]

        util, mem, power, clock = column(1), column(2), column(3), column(4)
        start_mj, end_mj = self._energy
        if start_mj is not None and end_mj is not None:
            energy, method = (end_mj - start_mj) / 1e3, "nvmlDeviceGetTotalEnergyConsumption difference"
        elif len(power) >= 2:
            times = [s[0] for s in self._samples if s[3] is not None]
            energy = sum((t1 - t0) * (p0 + p1) / 2 for t0, t1, p0, p1 in zip(times, times[1:], power, power[1:]))
            method = "power samples integrated over time (no energy counter on this GPU)"
        else:
            energy, method = None, "no energy counter and too few power samples"
        return NvmlSummary(
            available=True,
            device=self._name,
            samples=len(self._samples),
            duration_s=duration,
            gpu_util_pct_mean=sum(util) / len(util) if util else None,
            gpu_util_pct_max=max(util) if util else None,
            memory_used_bytes_max=max(mem) if mem else None,
            power_w_mean=sum(power) / len(power) if power else None,
            power_w_max=max(power) if power else None,
            sm_clock_mhz_mean=sum(clock) / len(clock) if clock else None,
            sm_clock_mhz_min=min(clock) if clock else None,
            sm_clock_mhz_max=max(clock) if clock else None,
            energy_j=energy,
            energy_method=method,
            inferences=inferences,
            energy_per_inference_j=energy / inferences if energy is not None and inferences else None,
        )


__all__ = ["NvmlSampler"]
