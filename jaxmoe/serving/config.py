"""The serving engine's settings (`EngineConfig`) and their checks, apart from the engine loop."""

from __future__ import annotations

import dataclasses

from jaxmoe.nn import sharding
from jaxmoe.nn.moe import Impl
from jaxmoe.serving.weights import Mode


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  mode: Mode = Mode.MIXED
  max_batch: int = 8
  max_seq_len: int = 256  # prompt + max_tokens must fit (encoder-decoder: each of them)
  max_wait_s: float = 1.0  # swap/resident: how long another tenant may wait before a switch
  impl: Impl = Impl.AUTO
  page_size: int = 16  # positions per KV-cache page
  kv_cache_gb: float | None = None  # KV pool per device (per data shard), 10^9 bytes; None: its rows' max_seq_len
  expert_cache_gb: float | None = None  # device bytes for experts (10^9); None: the whole pool on the device
  pinned_tenants: tuple[str, ...] = ()  # with an expert cache: tenants whose experts are never evicted
  history: int = 10_000  # recent requests the summary's percentiles cover (memory stays bounded)
  mesh: str = ""  # 'data:2,expert:4' (jaxmoe/serving/mesh.py); '': one device, no mesh
  placement: str = "round_robin"  # on a mesh: which expert shard holds each pool slot (serving/placement.py)
  split_backbones: bool = False  # on a mesh: attention and the LM head split over expert x model (serving/mesh.py)
  overlap: bool = True  # dispatch decode step n+1 before reading step n (one device, no expert cache only)


def check_config(config: EngineConfig, cfg) -> None:
  """Refuses an engine config that cannot serve the model `cfg`, naming the setting."""
  if config.max_batch < 1 or config.max_seq_len < 2:
    raise ValueError(f"need max_batch >= 1 and max_seq_len >= 2, got {config}")
  if config.page_size < 1 or config.page_size & (config.page_size - 1):
    raise ValueError(f"page_size={config.page_size} must be a power of two")
  if config.kv_cache_gb is not None and not config.kv_cache_gb > 0:
    raise ValueError(f"kv_cache_gb={config.kv_cache_gb} must be > 0")
  if cfg.max_positions is not None and config.max_seq_len > cfg.max_positions:
    raise ValueError(
      f"max_seq_len={config.max_seq_len} exceeds the model's max_position_embeddings={cfg.max_positions}"
    )
  sizes = dict(sharding.parse_mesh(config.mesh))
  if cfg.intermediate_size % sizes.get("model", 1):
    raise ValueError(
      f"mesh={config.mesh!r}: model:{sizes['model']} splits every expert's hidden features and must divide "
      f"the model's intermediate_size={cfg.intermediate_size}"
    )
  if config.max_batch % sizes.get("data", 1):
    raise ValueError(f"max_batch={config.max_batch} must be a multiple of the mesh's data:{sizes['data']}")


def num_pages(config: EngineConfig, page_bytes: int, pages_per_row: int, rows: int | None = None) -> int:
  """Pages in the pool of one device (a data shard's, on a mesh), the scratch page included: kv_cache_gb's
  worth, or room for `rows` rows of max_seq_len (default max_batch)."""
  if config.kv_cache_gb is None:
    return 1 + (config.max_batch if rows is None else rows) * pages_per_row
  pages = int(config.kv_cache_gb * 1e9 // page_bytes)
  if pages < 2:
    raise ValueError(f"kv_cache_gb={config.kv_cache_gb} holds {pages} pages of {page_bytes} bytes; at least 2")
  return pages
