"""align.hub: one offline rule (variables × values, library flags, proxies), with every socket call faked."""
from __future__ import annotations

import socket
import sys
from types import SimpleNamespace

import pytest

from align.data import hub

ENDPOINT = "https://hub.example:8443"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No offline variable, no proxy, no loaded library flag, and no real connection: a socket call is recorded."""
    for var in (*hub.OFFLINE_VARS, *hub.PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    for name in ("huggingface_hub.constants", "datasets.config"):
        monkeypatch.setitem(sys.modules, name, SimpleNamespace(HF_HUB_OFFLINE=False, ENDPOINT=ENDPOINT))
    calls = []

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise ConnectionRefusedError("faked")

    monkeypatch.setattr(socket, "create_connection", refuse)
    hub._connects.cache_clear()
    yield calls
    hub._connects.cache_clear()


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), (" YES ", True), ("on", True),
                                           ("0", False), ("", False), ("false", False), ("no", False)])
def test_each_offline_variable_switches_offline_mode_for_everyone(monkeypatch, clean, var, value, offline):
    monkeypatch.setenv(var, value)
    assert hub.offline_mode() is offline
    assert hub.local_only() is True  # offline, or (here) the faked hub refuses the connection
    assert len(clean) == (0 if offline else 1)  # offline mode never touches the network
    assert hub.offline_reason() == (f"{var} is set" if offline else "the Hugging Face Hub cannot be reached")


@pytest.mark.parametrize("name", ["huggingface_hub.constants", "datasets.config"])
def test_a_library_that_froze_offline_mode_at_import_is_honoured(monkeypatch, clean, name):
    monkeypatch.setitem(sys.modules, name, SimpleNamespace(HF_HUB_OFFLINE=True, ENDPOINT=ENDPOINT))
    assert hub.offline_mode() and hub.local_only()
    assert clean == [] and hub.offline_reason() == "offline mode is on (HF_HUB_OFFLINE)"


def test_reachable_hub_is_used_and_the_probe_goes_to_the_endpoints_host(monkeypatch, clean):
    seen = []

    def accept(address, timeout=None):
        seen.append((address, timeout))
        return SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(socket, "create_connection", accept)
    assert hub.local_only() is False
    assert seen == [(("hub.example", 8443), 3.0)]
    assert hub.local_only("https://other.example") is False and seen[-1][0] == ("other.example", 443)


def test_unreachable_hub_means_local_only_and_is_probed_once(clean):
    assert hub.local_only() is True and hub.local_only() is True
    assert clean == [(("hub.example", 8443), 3.0)]  # the answer is remembered: a miss costs seconds once


@pytest.mark.parametrize("proxy", hub.PROXY_VARS)
def test_behind_a_proxy_the_library_is_left_to_try(monkeypatch, clean, proxy):
    monkeypatch.setenv(proxy, "http://proxy.example:3128")
    assert hub.hub_reachable(ENDPOINT) is True and hub.local_only() is False
    assert clean == []  # a direct connection says nothing behind a proxy, so none is made
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.local_only() is True  # offline mode still wins over a proxy
