"""finemoe calls transformers' models through their current API: no deprecation warning from our calls on any
supported architecture or decode path (newer transformers renamed `past_key_values` to `cache`; older 5.x
releases, such as 5.17 on the GPU machine, take only `past_key_values`: models/kv_cache.py picks per model)."""
from __future__ import annotations

import warnings

import pytest

from finemoe.config import EngineConfig
from finemoe.engine import Engine, SamplingParams
from helpers import CONFIGS, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: save_tiny_checkpoint(arch, root / arch) for arch in CONFIGS}


@pytest.mark.parametrize("fast_path", [True, False], ids=["static-cache", "dynamic-cache"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_generate_raises_no_deprecation_warning(checkpoints, arch, fast_path):
    engine = Engine.from_config(EngineConfig(model=str(checkpoints[arch]), device="cpu", expert_budget="25%",
                                             fast_path=fast_path, show_progress=False))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reqs = engine.generate(["Hello there", "Hi"], SamplingParams(max_new_tokens=3, ignore_eos=True))
    finally:
        engine.close()
    assert all(len(r.output_ids) == 3 for r in reqs)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
