"""Noise/time parameterisations and the exact conversions between them.

Every parameterisation is a Gaussian path and a prediction type:

    x_t = α(t)·x0 + σ(t)·ε,   ε ~ N(0, I),   t from ``t_min`` (clean) to ``t_max`` (noise)

and a network output ("prediction") that maps, given x_t and t, affinely to (x̂0, ε̂):

| name       | α(t), σ(t)                          | t range          | prediction                    |
|------------|-------------------------------------|------------------|-------------------------------|
| ``vp-eps`` | linear-β VP (DDPM in continuous t)  | [1e-3, 1]        | ε                             |
| ``vp-v``   | same                                | [1e-3, 1]        | v = α·ε − σ·x0 (Salimans & Ho) |
| ``ddpm-eps``, ``ddpm-v`` | discrete DDPM ᾱ_k, interpolated  | [0, 1], k = t·(T−1) | ε or v, as above        |
| ``edm``    | α = 1, σ = t (Karras et al. 2022)   | [0.002, 80]      | F, x̂0 = c_skip·x + c_out·F     |
| ``fm``     | α = 1 − t, σ = t (rectified flow)   | [0, 1]           | velocity u = ε − x0           |
| ``trigflow`` | α = cos t, σ = σ_d·sin t (sCM)    | [0, π/2]         | F, σ_d·F = dx_t/dt            |

Two parameterisations describe the same state when their noise-to-signal ratios σ/α agree; the
states then differ by the factor α_dst/α_src (``convert_state``), and any prediction converts
exactly through (x̂0, ε̂) (``convert_prediction``). Networks see ``model_input(x_t, t)`` (EDM's
c_in and c_noise, TrigFlow's x/σ_d; identity elsewhere).

Shapes: states [B, ...] of any trailing shape; t [B].
"""

from __future__ import annotations

import math

import torch


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t: [B] -> [B, 1, ..., 1] broadcastable against ``like``: [B, ...]."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


class Parameterisation:
    """Base class: α(t), σ(t), the prediction's affine map to (x0, ε) and its inverse."""

    name = "base"
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def time_from_ratio(self, r: torch.Tensor) -> torch.Tensor:
        """The t with σ(t)/α(t) = r (r ≥ 0); inverse of ``ratio``."""
        raise NotImplementedError

    def ratio(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def alpha_sigma_dt(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α'(t), σ'(t)) by forward-mode AD of ``alpha_sigma``: exact, no per-class formulas."""
        _, tangents = torch.func.jvp(self.alpha_sigma, (t,), (torch.ones_like(t),))
        return tangents

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return expand(alpha, x0) * x0 + expand(sigma, x0) * eps

    def to_x0_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def from_x0_eps(self, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction a perfect network makes for (x0, ε): the regression target."""
        raise NotImplementedError

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network is fed for (x_t, t). Default: unchanged."""
        return x_t, t

    def state_from_model_input(self, x_in: torch.Tensor, t_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of ``model_input``: (x_t, t) from what the network is fed."""
        return x_in, t_in

    def predict(self, net, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The network's prediction at (x_t, t)."""
        x_in, t_in = self.model_input(x_t, t)
        return net(x_in, t_in, **cond)

    def sample_train_time(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times [n]. Default: uniform on (t_min, t_max)."""
        u = torch.rand(n, device=device, generator=generator)
        return self.t_min + (self.t_max - self.t_min) * u

    def timesteps(self, steps: int, device=None) -> torch.Tensor:
        """``steps + 1`` sampling times from t_max down to t_min (uniform in t by default)."""
        return torch.linspace(self.t_max, self.t_min, steps + 1, device=device, dtype=torch.float64)

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return (x_t - expand(sigma, x_t) * eps) / expand(alpha, x_t)

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return (x_t - expand(alpha, x_t) * x0) / expand(sigma, x_t)


class VP(Parameterisation):
    """Variance preserving, linear β (Ho et al. 2020 in continuous time, Song et al. 2021):
    log α(t) = −¼t²(β₁ − β₀) − ½t·β₀, σ = √(1 − α²). ``prediction``: "eps" or "v"."""

    t_min, t_max = 1e-3, 1.0

    def __init__(self, prediction: str = "eps", beta_min: float = 0.1, beta_max: float = 20.0):
        if prediction not in ("eps", "v"):
            raise ValueError(f"VP: prediction must be 'eps' or 'v', got {prediction!r}")
        self.prediction, self.beta_min, self.beta_max = prediction, beta_min, beta_max
        self.name = f"vp-{prediction}"

    def alpha_sigma(self, t):
        log_alpha = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))

    def time_from_ratio(self, r):
        # α² = 1/(1+r²): solve ¼Δ·t² + ½β₀·t − ½·log(1+r²) = 0 for t ≥ 0.
        a, b, c = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min, -0.5 * torch.log1p(r**2)
        return (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)

    def to_x0_eps(self, x_t, pred, t):
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, pred, t), pred
        alpha, sigma = (expand(v, x_t) for v in self.alpha_sigma(t))
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred

    def from_x0_eps(self, x_t, x0, eps, t):
        if self.prediction == "eps":
            return eps
        alpha, sigma = (expand(v, x_t) for v in self.alpha_sigma(t))
        return alpha * eps - sigma * x0


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def discrete_betas(schedule: str, beta_start: float, beta_end: float, steps: int) -> torch.Tensor:
    """β_1..β_T [T] float32 of the named DDPM schedules: ``linear`` (Ho et al. 2020), ``scaled_linear``
    (linear in √β, Rombach et al. 2022) and ``squaredcos_cap_v2`` (the cosine ᾱ of Nichol &
    Dhariwal 2021, β capped at 0.999; β_start/β_end unused). Float32 on purpose: the diffusers
    schedulers compute them so, and the noise levels must agree with theirs bit for bit."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class DiscreteVP(VP):
    """Variance preserving on a discrete schedule ᾱ_0..ᾱ_{T−1} (DDPM as trained, e.g. by diffusers'
    DDPMScheduler): continuous t ∈ [0, 1] is the timestep k = t·(T−1) rescaled, and

        log α(t)² = log ᾱ interpolated linearly in k,   σ = √(1 − α²),

    so α, σ equal √ᾱ_k, √(1 − ᾱ_k) exactly at every integer timestep (where the network was
    trained) and stay smooth and monotone in between (``time_from_ratio`` inverts it exactly).
    ``prediction``: "eps" or "v" (v = α·ε − σ·x0, diffusers' ``v_prediction``). ``timesteps(n)``
    are integer timesteps, the same as diffusers' LCMScheduler with ``original_inference_steps=T``.
    The ε/v conversions are VP's.
    """

    t_min, t_max = 0.0, 1.0

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps", name: str | None = None):
        if prediction not in ("eps", "v"):
            raise ValueError(f"DiscreteVP: prediction must be 'eps' or 'v', got {prediction!r}")
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if len(ac) < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("DiscreteVP: alphas_cumprod must decrease strictly inside (0, 1) "
                             "(zero-terminal-SNR schedules are not supported)")
        self.prediction, self.num_steps = prediction, len(ac)
        self.log_ac = torch.log(ac)  # [T], decreasing
        self.name = name or f"ddpm-{prediction}"

    @classmethod
    def from_schedule(cls, prediction: str = "eps", schedule: str = "linear", beta_start: float = 1e-4,
                      beta_end: float = 0.02, steps: int = 1000) -> DiscreteVP:
        """A named beta schedule (defaults: DDPM's linear 1e-4..0.02 over 1000 steps, ``ddpm-<pred>``)."""
        betas = discrete_betas(schedule, beta_start, beta_end, steps)
        ac = torch.cumprod(1.0 - betas, dim=0)
        default = (schedule, beta_start, beta_end, steps) == ("linear", 1e-4, 0.02, 1000)
        name = f"ddpm-{prediction}" if default else f"ddpm-{prediction}:{schedule}:{beta_start!r}:{beta_end!r}:{steps}"
        return cls(ac, prediction, name=name)

    @classmethod
    def from_name(cls, name: str) -> DiscreteVP:
        """Parse ``ddpm-<eps|v>:<schedule>:<β_start>:<β_end>:<T>``."""
        parts = name.split(":")
        prediction = parts[0].removeprefix("ddpm-")
        if len(parts) != 5 or prediction not in ("eps", "v"):
            raise ValueError(f"bad discrete schedule {name!r}; expected ddpm-<eps|v>:<schedule>:<beta_start>:"
                             f"<beta_end>:<T>, e.g. ddpm-eps:scaled_linear:0.00085:0.012:1000")
        try:
            beta_start, beta_end, steps = float(parts[2]), float(parts[3]), int(parts[4])
        except ValueError:
            raise ValueError(f"bad discrete schedule {name!r}: beta_start, beta_end must be numbers, "
                             "T an integer") from None
        return cls.from_schedule(prediction, parts[1], beta_start, beta_end, steps)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The (continuous) diffusers timestep k = t·(T−1) [B], float64. Within 1e-3 of an integer
        it is snapped to it: times arrive in float32, where t·(T−1) misses the integer by ~1e-4,
        and the network must be queried exactly where it was trained. The snap keeps dk/dt = T−1
        (its offset is detached), so ``alpha_sigma_dt`` stays right."""
        k = t.to(torch.float64) * (self.num_steps - 1)
        offset = torch.where((k - k.round()).abs() < 1e-3, k.round() - k, torch.zeros_like(k))
        return k + offset.detach()

    def alpha_sigma(self, t):
        k = self.timestep(t)
        log_ac = self.log_ac.to(k.device)
        # Segment [i, i+1] holding k (the end segments extend linearly beyond [0, T−1]); the
        # (1−f)·a + f·b form is exact at both knots.
        i = k.detach().floor().clamp(0, self.num_steps - 2).long()
        f = k - i
        # torch.take, not log_ac[i]: a 0-dim index would be read on the host (a sync; no value on fakes).
        log_a2 = (1 - f) * torch.take(log_ac, i) + f * torch.take(log_ac, i + 1)
        return torch.exp(0.5 * log_a2).to(t.dtype), torch.sqrt(-torch.expm1(log_a2)).to(t.dtype)

    def time_from_ratio(self, r):
        # α² = 1/(1 + r²): find log α² on the decreasing table, invert the linear piece.
        target = -torch.log1p(r.to(torch.float64) ** 2)
        neg = -self.log_ac.to(r.device)  # increasing
        i = (torch.searchsorted(neg, -target) - 1).clamp(0, self.num_steps - 2)
        f = (-target - neg[i]) / (neg[i + 1] - neg[i])
        return ((i + f) / (self.num_steps - 1)).to(r.dtype)

    def timesteps(self, steps, device=None):
        """Integer timesteps k_i = (T−1) − ⌊i·T/steps⌋ for i < steps, then 0, as t = k/(T−1)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"{self.name}: steps must be in [1, {self.num_steps}], got {steps}")
        k = [(self.num_steps - 1) - (i * self.num_steps) // steps for i in range(steps)] + [0]
        return torch.tensor(k, device=device, dtype=torch.float64) / (self.num_steps - 1)


class EDM(Parameterisation):
    """Karras et al. 2022 ("Elucidating the Design Space ..."): x_t = x0 + σ·ε with t = σ, and the
    preconditioned network D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) (Table 1). Sampling
    times follow the ρ = 7 schedule."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_data, self.t_min, self.t_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.name = "edm"

    def alpha_sigma(self, t):
        return torch.ones_like(t), t

    def time_from_ratio(self, r):
        return r

    def _c(self, x_t, t):
        s, sd = expand(t, x_t), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / torch.sqrt(s**2 + sd**2)
        return c_skip, c_out

    def model_input(self, x_t, t):
        c_in = 1.0 / torch.sqrt(expand(t, x_t) ** 2 + self.sigma_data**2)
        return c_in * x_t, 0.25 * torch.log(t)

    def state_from_model_input(self, x_in, t_in):
        t = torch.exp(4 * t_in)
        return x_in * torch.sqrt(expand(t, x_in) ** 2 + self.sigma_data**2), t

    def to_x0_eps(self, x_t, pred, t):
        c_skip, c_out = self._c(x_t, t)
        x0 = c_skip * x_t + c_out * pred
        return x0, self.eps_from_x0(x_t, x0, t)

    def from_x0_eps(self, x_t, x0, eps, t):
        c_skip, c_out = self._c(x_t, t)
        return (x0 - c_skip * x_t) / c_out

    def sample_train_time(self, n, device=None, generator=None):
        # log σ ~ N(−1.2, 1.2²) (EDM's P_mean, P_std).
        return torch.exp(-1.2 + 1.2 * torch.randn(n, device=device, generator=generator))

    def timesteps(self, steps, device=None):
        ramp = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)
        inv = 1.0 / self.rho
        return (self.t_max**inv + ramp * (self.t_min**inv - self.t_max**inv)) ** self.rho


class FlowMatching(Parameterisation):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022): x_t = (1−t)·x0 + t·ε,
    the network predicts the velocity u = dx_t/dt = ε − x0."""

    name = "fm"
    t_min, t_max = 0.0, 1.0

    def alpha_sigma(self, t):
        return 1.0 - t, t

    def time_from_ratio(self, r):
        return r / (1.0 + r)

    def sample_train_time(self, n, device=None, generator=None):
        # Logit-normal t (Esser et al. 2024, SD3): more weight on the middle of the path.
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))

    def to_x0_eps(self, x_t, pred, t):
        s = expand(t, x_t)
        return x_t - s * pred, x_t + (1.0 - s) * pred

    def from_x0_eps(self, x_t, x0, eps, t):
        return eps - x0


class TrigFlow(Parameterisation):
    """TrigFlow (Lu & Song 2024): x_t = cos t·x0 + sin t·σ_d·ε; the network sees x_t/σ_d and
    predicts F with σ_d·F = dx_t/dt = cos t·σ_d·ε − sin t·x0 (see ``kdlib.diffusion.trigflow``)."""

    name = "trigflow"
    t_min, t_max = 0.0, math.pi / 2

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def alpha_sigma(self, t):
        return torch.cos(t), self.sigma_data * torch.sin(t)

    def time_from_ratio(self, r):
        return torch.atan(r / self.sigma_data)

    def sample_train_time(self, n, device=None, generator=None):
        # tan(t)·σ_d log-normal, τ ~ N(−1, 1.4²) (sCM's proposal).
        tau = -1.0 + 1.4 * torch.randn(n, device=device, generator=generator)
        return torch.atan(torch.exp(tau) / self.sigma_data)

    def model_input(self, x_t, t):
        return x_t / self.sigma_data, t

    def state_from_model_input(self, x_in, t_in):
        return x_in * self.sigma_data, t_in

    def to_x0_eps(self, x_t, pred, t):
        c, s, sd = torch.cos(expand(t, x_t)), torch.sin(expand(t, x_t)), self.sigma_data
        return c * x_t - s * sd * pred, (s * x_t + c * sd * pred) / sd

    def from_x0_eps(self, x_t, x0, eps, t):
        c, s, sd = torch.cos(expand(t, x_t)), torch.sin(expand(t, x_t)), self.sigma_data
        return c * eps - s * x0 / sd


PARAMETERISATIONS = {
    "vp-eps": lambda: VP("eps"),
    "vp-v": lambda: VP("v"),
    "ddpm-eps": lambda: DiscreteVP.from_schedule("eps"),
    "ddpm-v": lambda: DiscreteVP.from_schedule("v"),
    "edm": EDM,
    "fm": FlowMatching,
    "trigflow": TrigFlow,
}


def get_parameterisation(name: str) -> Parameterisation:
    """A parameterisation with default settings by name (``vp-eps``, ``vp-v``, ``ddpm-eps``, ``ddpm-v``,
    ``edm``, ``fm``, ``trigflow``), or a discrete schedule spelled out as
    ``ddpm-<eps|v>:<linear|scaled_linear|squaredcos_cap_v2>:<β_start>:<β_end>:<T>``."""
    if name.startswith("ddpm-") and ":" in name:
        return DiscreteVP.from_name(name)
    if name not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {name!r}; choose one of {', '.join(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[name]()


def convert_state(x_t: torch.Tensor, t: torch.Tensor, src: Parameterisation,
                  dst: Parameterisation) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noisy state in ``dst``: time with equal σ/α, state rescaled by α_dst/α_src."""
    t_dst = dst.time_from_ratio(src.ratio(t))
    scale = dst.alpha_sigma(t_dst)[0] / src.alpha_sigma(t)[0]
    return expand(scale, x_t) * x_t, t_dst


def convert_prediction(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, src: Parameterisation,
                       dst: Parameterisation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``src`` prediction at (x_t, t) as a ``dst`` prediction: returns (pred_dst, x_dst, t_dst)."""
    x0, eps = src.to_x0_eps(x_t, pred, t)
    x_dst, t_dst = convert_state(x_t, t, src, dst)
    return dst.from_x0_eps(x_dst, x0, eps, t_dst), x_dst, t_dst
