"""--devices: validated in one place (config.parse_devices via EngineConfig), one-line errors."""
import pytest
import torch

from types import SimpleNamespace

from finemoe.config import EngineConfig, capacity_for, parse_devices
from finemoe.errors import ConfigError


def test_devices_cpu_is_device_cpu():
    cfg = EngineConfig(device="cpu", devices="cpu")
    assert cfg.devices == ("cpu",) and cfg.device == "cpu"


@pytest.mark.parametrize("text, message", [
    ("cpu,,cpu", "has an empty entry"),
    ("tpu:0", "device 'tpu:0' is not supported"),
    ("cpu,cpu", "cpu runs alone"),
])
def test_bad_device_lists_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(device="cpu", devices=text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_a_gpu_that_is_not_there_is_refused():
    with pytest.raises(ConfigError, match="'cuda:0' was requested but no CUDA GPU is visible"):
        EngineConfig(device="cpu", devices="cuda:0,cuda:1")


def test_duplicates_and_disagreeing_device_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_devices("cuda:1, cuda:0", "cuda") == ("cuda:1", "cuda:0")
    with pytest.raises(ConfigError, match="names a device twice"):
        parse_devices("cuda:0,cuda:0", "cuda")
    with pytest.raises(ConfigError, match="'cuda:2' is not available: 2 GPU"):
        parse_devices("cuda:0,cuda:2", "cuda")
    with pytest.raises(ConfigError, match="--device cuda:1 and --devices cuda:0,cuda:1 disagree"):
        parse_devices("cuda:0,cuda:1", "cuda:1")
    with pytest.raises(ConfigError, match="--device cpu and --devices cuda:0 disagree"):
        parse_devices("cuda:0", "cpu")


def test_a_resident_policy_is_refused_on_several_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = EngineConfig(policy="resident", devices="cuda:0,cuda:1")
    with pytest.raises(ConfigError, match="'resident' keeps every expert on one device"):
        capacity_for(cfg, SimpleNamespace(total_bytes=1000), keeps_all_resident=True)


def test_the_idle_issue_rule_is_refused_on_several_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="--prefetch-issue idle is not available with several --devices"):
        EngineConfig(devices="cuda:0,cuda:1", prefetch_issue="idle")
