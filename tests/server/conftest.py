"""Stores for the server tests: tiny synthetic tenants, saved and consolidated, with chat templates."""

from __future__ import annotations

import json

import pytest

from jaxmoe.consolidate.pipeline import ConsolidateConfig, consolidate
from jaxmoe.families.mixtral import config
from jaxmoe.io import checkpoint
from jaxmoe.serving.synthetic import synthetic_store

# tenant0 and tenant1 get different templates; tenant2 has none (chat is refused for it). Rendered
# prompts stay within 8 tokens, the smallest prompt bucket, so the tests compile few programs.
TEMPLATES = {
  "tenant0": "{% for m in messages %}{{ m.role[0] }}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
  "tenant1": "{% if messages[0].role == 'system' %}{{ raise_exception('system messages are not allowed') }}{% endif %}"
  "{% for m in messages %}{{ m.content | upper }}{{ loop.index }}{% endfor %}{% if add_generation_prompt %}?{% endif %}",
}
QUALITY = {"tenant0": {"perplexity_ratio": 1.012}}


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
  """Three tenants consolidated at share_fraction 0.5, with a quality entry in store.json."""
  root = tmp_path_factory.mktemp("server_store")
  mem = synthetic_store(config.preset("tiny"), k=3, seed=2, own_fraction=0.5, noise=0.05)
  pairs = []
  for name in mem.tenants:
    checkpoint.save(root / name, mem.config, mem.export_params(name))
    pairs.append((name, root / name))
  store = root / "store"
  consolidate(pairs, store, ConsolidateConfig(share_fraction=0.5))
  for tenant, template in TEMPLATES.items():
    (store / "backbones" / tenant / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  header = json.loads((store / "store.json").read_text())
  header["quality"] = QUALITY
  (store / "store.json").write_text(json.dumps(header))
  return store
