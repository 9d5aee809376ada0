"""Noise schedules exactly as ComfyUI's KSampler builds them (see ../shared/docs/sampler.md §2).

* SD1.5 / SDXL: discrete eps schedule, betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)**2
  (float64), sigmas = sqrt((1 - alphas_cumprod) / alphas_cumprod) as float32.
* Flux.1 dev: the flow schedule with shift mu (sigma(t) = e^mu / (e^mu + 1/t - 1)), mu = 1.15;
  schnell: no shift (sigma(t) = t).
Schedulers: ``normal`` (ComfyUI: timesteps evenly spaced, log-sigma interpolation for the discrete
schedule) and ``simple`` (every len/steps-th sigma of the table, from the top).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULERS = ("normal", "simple")


@dataclass(frozen=True)
class Discrete:
    """SD1.x / SDXL eps-prediction schedule over 1000 training timesteps."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    steps: int = 1000

    def table(self) -> torch.Tensor:
        betas = torch.linspace(self.linear_start ** 0.5, self.linear_end ** 0.5, self.steps, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        return (((1 - ac) / ac) ** 0.5).float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep t: interpolate log sigma between the integer steps."""
        log_sigmas = self.table().log()
        t = t.float().clamp(0, self.steps - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer timestep whose sigma is nearest in log space (what ComfyUI feeds the UNet)."""
        dists = sigma.float().log().reshape(-1, 1) - self.table().log().reshape(1, -1)
        return dists.abs().argmin(dim=1).reshape(sigma.shape).float()

    @property
    def sigma_max(self) -> float:
        return float(self.table()[-1])

    @property
    def sigma_min(self) -> float:
        return float(self.table()[0])


@dataclass(frozen=True)
class Flow:
    """Flux rectified-flow sigmas. dev: ``ModelSamplingFlux``, time shift mu (sigma(t) = e^mu /
    (e^mu + 1/t - 1)) over a 10000-step table; schnell: ``mu=None`` (no shift), 1000 steps."""

    mu: float | None = 1.15
    steps: int = 10000

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        if self.mu is None:
            return t.float()
        e = math.exp(self.mu)
        return (e / (e + (1.0 / t - 1.0))).float()

    def table(self) -> torch.Tensor:
        return self.sigma(torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(1.0)))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(1.0 / self.steps)))


FLUX_DEV = Flow(1.15, 10000)
FLUX_SCHNELL = Flow(None, 1000)


def flux_mu(width: int, height: int) -> float:
    """ComfyUI's ModelSamplingFlux node: mu from the image size (1.15 at 1024x1024)."""
    return 0.5 + (1.15 - 0.5) * (width * height / 256 - 256) / (4096 - 256)


def sigmas(schedule: Discrete | Flow, steps: int, scheduler: str = "normal") -> torch.Tensor:
    """``steps`` sigmas from high to low, then 0 (float32), as ComfyUI's scheduler of that name."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if scheduler == "normal":
        if isinstance(schedule, Discrete):
            t = torch.linspace(schedule.steps - 1, 0, steps)
        else:
            t_max = float(schedule.timestep(torch.tensor(schedule.sigma_max)))
            t_min = float(schedule.timestep(torch.tensor(schedule.sigma_min)))
            t = torch.linspace(t_max, t_min, steps)
        out = schedule.sigma(t)
    elif scheduler == "simple":
        table = schedule.table()
        stride = len(table) / steps
        out = torch.stack([table[-(1 + int(x * stride))] for x in range(steps)])
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    return torch.cat([out.float(), torch.zeros(1)])
