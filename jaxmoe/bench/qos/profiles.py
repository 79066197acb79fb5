"""Benchmark profiles: frozen configs in a registry with exact-name lookup.

  cpu-tiny              the tiny Mixtral preset, K = 4, the paper's lengths and
                        a spread, load 0.1-0.55; <= 3 minutes on 2 CPU cores
  gpu-mixtral8          Mixtral-8x7B widths, 8 of 32 layers, bf16, K = 4 tenants
                        perturbing a quarter of the experts of one random base
  gpu-mixtral32-single  full Mixtral-8x7B shape, one tenant: decode tokens/s at
                        batch 1, 8, 32 against the HF transformers figures

Rates are load factors: fractions of the single model's measured capacity
(its backlog throughput on the same lengths), so a sweep covers the same
load levels on a fast and a slow machine. `dry_run(profile)` keeps a
profile's structure (systems, K, sharing, popularity, sweeps) with tiny
widths and short traces, to check on a CPU that a GPU profile builds and runs.
"""

from __future__ import annotations

import dataclasses

from jaxmoe.bench.qos.driver import Timer
from jaxmoe.bench.qos.hoststore import StoreSpec
from jaxmoe.bench.qos.systems import SYSTEMS
from jaxmoe.bench.qos.workload import Dist, LengthProfile, paper_lengths, spread_lengths
from jaxmoe.families.mixtral.config import MixtralConfig, preset
from jaxmoe.nn.moe import Impl
from jaxmoe.serving import EngineConfig, Mode


@dataclasses.dataclass(frozen=True)
class ServeSpec:
  """Engine settings shared by every system of a profile."""

  max_batch: int = 8
  max_seq_len: int = 128
  max_wait_s: float = 0.05  # swap, resident, full-swap: longest another tenant waits before a switch
  impl: Impl = Impl.AUTO
  expert_cache_gb: float | None = None  # device bytes for experts (10^9); None: every pool on the device

  def engine_config(self, mode: Mode = Mode.MIXED) -> EngineConfig:
    return EngineConfig(
      mode=mode,
      max_batch=self.max_batch,
      max_seq_len=self.max_seq_len,
      max_wait_s=self.max_wait_s,
      impl=self.impl,
      expert_cache_gb=self.expert_cache_gb,
    )


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One length profile over a range of load levels."""

  lengths: LengthProfile
  load_factors: tuple[float, ...]  # x the single model's capacity (requests/s)
  requests: int  # per rate (about; Poisson)
  capacity_requests: int  # backlog size of the capacity run

  @property
  def name(self) -> str:
    return self.lengths.name


@dataclasses.dataclass(frozen=True)
class QosProfile:
  name: str
  description: str
  platform: str  # "cpu" or "gpu": where it is meant to run
  store: StoreSpec
  serve: ServeSpec
  sweeps: tuple[Sweep, ...]
  skew: float = 1.0  # Zipf popularity exponent over tenants
  systems: tuple[str, ...] = SYSTEMS
  mig_budget_bytes: int | None = None  # None: the consolidated jaxmoe store's weight bytes
  capacity_repeats: int = 3  # capacity runs per system and sweep; the best counts
  timer: Timer = Timer.WALL  # what the lanes' clocks count (driver.py); PROCESS_CPU only for CPU profiles
  paired_capacity: bool = False  # alternate the single model's capacity runs with each system's (runner.py)
  seed: int = 0

  def __post_init__(self):
    for s in self.sweeps:
      if s.lengths.max_total > self.serve.max_seq_len:
        raise ValueError(
          f"{self.name}: sweep {s.name} needs {s.lengths.max_total} positions, max_seq_len is {self.serve.max_seq_len}"
        )
    unknown = set(self.systems) - set(SYSTEMS)
    if unknown or "single" not in self.systems:
      raise ValueError(f"{self.name}: systems must include 'single' and come from {SYSTEMS}")


@dataclasses.dataclass(frozen=True)
class DecodeProfile:
  """Decode throughput of one model at several batch sizes (random weights made on the device)."""

  name: str
  description: str
  platform: str
  model: MixtralConfig
  batches: tuple[int, ...] = (1, 8, 32)
  context: int = 128  # tokens already in the KV cache when decoding starts (HF runs: prompt 128)
  steps: int = 64  # timed decode steps per batch size
  warmup_steps: int = 3
  compile_timeout_s: float = 1200.0
  impl: Impl = Impl.AUTO
  hf_tokens_per_s: tuple[tuple[int, float], ...] = ()  # (batch, HF transformers tok/s) measured on an H200
  goal_factor: float = 10.0
  seed: int = 0


def _tiny() -> MixtralConfig:
  return preset("tiny").replace(eos_token_id=None)  # EOS off: outputs run to max_tokens


def _mixtral(layers: int | None = None) -> MixtralConfig:
  cfg = preset("mixtral-8x7b").replace(eos_token_id=None)
  return cfg if layers is None else cfg.replace(num_layers=layers)


CPU_TINY = QosProfile(
  name="cpu-tiny",
  description="tiny Mixtral preset (D=64, L=2, E=4, top-2), K=4 tenants, a quarter of the experts "
  "their own; paper lengths and a spread; load 0.1-0.55 of one model's capacity",
  platform="cpu",
  store=StoreSpec(_tiny(), tenants=4, own_fraction=0.25, noise=0.05, scale=0.1),
  serve=ServeSpec(max_batch=8, max_seq_len=80, max_wait_s=0.03),
  # Load up to 0.55: past the partition's capacity (about 0.3 of one model's), below the jaxmoe
  # modes' on a CPU (about 0.7-0.85), where turnaround near saturation would differ run to run.
  sweeps=(
    Sweep(paper_lengths(prompt=12, output=25), (0.1, 0.25, 0.4, 0.55), requests=100, capacity_requests=64),
    # Prompts within one length bucket (9-16) keep the compile count down; outputs spread 4-56.
    Sweep(spread_lengths(Dist(12, 0.3, 9, 16), Dist(20, 0.6, 4, 56)), (0.25, 0.5), requests=64, capacity_requests=64),
  ),
  capacity_repeats=2,
  timer=Timer.PROCESS_CPU,
  paired_capacity=True,
)

GPU_MIXTRAL8 = QosProfile(
  name="gpu-mixtral8",
  description="Mixtral-8x7B widths, 8 of 32 layers, bf16, K=4 tenants from one random base, a quarter "
  "of the experts perturbed per tenant; MIG as 4 slices of an 80 GB card",
  platform="gpu",
  store=StoreSpec(_mixtral(layers=8), tenants=4, own_fraction=0.25, noise=0.05, scale=0.02),
  serve=ServeSpec(max_batch=8, max_seq_len=192, max_wait_s=0.5),
  sweeps=(
    Sweep(paper_lengths(prompt=16, output=25), (0.1, 0.3, 0.5, 0.7), requests=64, capacity_requests=64),
    # Prompts within one length bucket (17-32): each bucket costs compiles at these widths.
    Sweep(spread_lengths(Dist(24, 0.3, 17, 32), Dist(48, 0.6, 8, 128)), (0.3, 0.6), requests=48, capacity_requests=48),
  ),
  mig_budget_bytes=80 * 10**9,
  timer=Timer.WALL,
)

# The paper's own setting, scaled like gpu-mixtral8 (8 of 32 layers: a quarter of the bytes): an 80 GB
# card becomes 20 GB of weights. The 112-slot pool (39 GB) does not fit: 4 backbones take ~4.8 GB, and
# 15 GB of experts (38% of the pool) stay resident in the device expert cache; the rest is copied in
# from pinned host memory when routed. The MIG baseline gets 1/4 of the 20 GB per slice.
GPU_MIXTRAL8_OFFLOAD = dataclasses.replace(
  GPU_MIXTRAL8,
  name="gpu-mixtral8-offload",
  description="gpu-mixtral8 under the paper's 80 GB budget scaled to 8 layers (20 GB): experts beyond "
  "15 GB of device expert cache stay on the host; MIG as 4 slices of those 20 GB",
  serve=dataclasses.replace(GPU_MIXTRAL8.serve, expert_cache_gb=15.0),
  mig_budget_bytes=20 * 10**9,
)

GPU_MIXTRAL32_SINGLE = DecodeProfile(
  name="gpu-mixtral32-single",
  description="full Mixtral-8x7B shape (46.7B parameters, bf16, random), one tenant: decode tok/s at "
  "batch 1, 8, 32 with 128 tokens of context",
  platform="gpu",
  model=_mixtral(),
  hf_tokens_per_s=((1, 9.6), (8, 43.5), (32, 62.0)),
)

PROFILES: dict[str, QosProfile | DecodeProfile] = {
  p.name: p for p in (CPU_TINY, GPU_MIXTRAL8, GPU_MIXTRAL8_OFFLOAD, GPU_MIXTRAL32_SINGLE)
}


def get(name: str) -> QosProfile | DecodeProfile:
  """Exact-name lookup in the registry."""
  if name not in PROFILES:
    raise KeyError(f"unknown profile {name!r}; known: {sorted(PROFILES)}")
  return PROFILES[name]


def tiny_widths(cfg: MixtralConfig) -> MixtralConfig:
  """The same architecture (experts, top-k, GQA ratio) at CPU-test widths, float32, 2 layers."""
  heads = 4
  return cfg.replace(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=heads,
    num_kv_heads=max(1, heads // cfg.group_size),
    head_dim=16,
    dtype="float32",
    max_position_embeddings=max(512, cfg.max_position_embeddings // 64),
  )


def _short_sweep(s: Sweep, serve: ServeSpec) -> Sweep:
  cap = serve.max_seq_len // 2
  half = cap // 2

  def clip(d: Dist) -> Dist:
    return Dist(min(d.median, half), d.sigma, min(d.lo, half), min(d.max, half))

  lengths = dataclasses.replace(s.lengths, prompt=clip(s.lengths.prompt), output=clip(s.lengths.output))
  return Sweep(lengths, s.load_factors[:2], requests=8, capacity_requests=8)


def dry_run(profile: QosProfile | DecodeProfile) -> QosProfile | DecodeProfile:
  """The profile at tiny widths with short traces (module docstring)."""
  if isinstance(profile, DecodeProfile):
    return dataclasses.replace(
      profile,
      name=f"{profile.name}-dry-run",
      platform="cpu",
      model=tiny_widths(profile.model),
      steps=4,
      warmup_steps=1,
      compile_timeout_s=300.0,
      hf_tokens_per_s=(),
    )  # no HF figure at tiny widths
  serve = dataclasses.replace(profile.serve, max_batch=min(profile.serve.max_batch, 4), max_seq_len=64, max_wait_s=0.05)
  store = dataclasses.replace(profile.store, model=tiny_widths(profile.store.model), scale=0.1)
  return dataclasses.replace(
    profile,
    name=f"{profile.name}-dry-run",
    platform="cpu",
    store=store,
    serve=serve,
    sweeps=tuple(_short_sweep(s, serve) for s in profile.sweeps[:1]),
    mig_budget_bytes=None,
    timer=Timer.WALL,
    capacity_repeats=1,
  )
