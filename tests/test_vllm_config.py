"""The vLLM plugin's switches and refusals, which need no vLLM (tests/vllm_plugin runs the plugin in real engines)."""
from types import SimpleNamespace

import pytest

from ddtree import vllm as plugin


def test_tree_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(plugin.TREE_ENV, raising=False)
    assert plugin.tree_mode() is None
    monkeypatch.setenv(plugin.TREE_ENV, "")
    assert plugin.tree_mode() is None  # set but empty counts as unset
    for mode in plugin.TREE_MODES:
        monkeypatch.setenv(plugin.TREE_ENV, f" {mode} ")
        assert plugin.tree_mode() == mode
    monkeypatch.setenv(plugin.TREE_ENV, "beam")
    with pytest.raises(plugin.PluginError, match=r"DDTREE_VLLM_TREE='beam'; choose one of ddtree, caddtree"):
        plugin.tree_mode()


def test_register_is_inert_without_the_variable(monkeypatch):
    # vLLM calls register() in every process; unset, it must not even import vLLM (not installed here).
    monkeypatch.delenv(plugin.TREE_ENV, raising=False)
    assert plugin.register() is None


@pytest.mark.parametrize("version", ["0.32.0", "0.32.7"])
def test_supported_vllm_versions(version):
    plugin.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.3.2"])
def test_other_vllm_versions_are_refused(version):
    with pytest.raises(plugin.PluginError, match=rf"vLLM {version} is installed; this plugin supports vLLM 0\.32\.x"):
        plugin.check_vllm_version(version)


def config(method="dflash", async_scheduling=False, mrope=False, spec=True):
    return SimpleNamespace(
        speculative_config=SimpleNamespace(method=method) if spec else None,
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
        model_config=SimpleNamespace(uses_mrope=mrope),
    )


def test_check_config_accepts_dflash_and_no_drafting():
    plugin.check_config(config())
    plugin.check_config(config(spec=False, async_scheduling=True, mrope=True))  # nothing to verify


@pytest.mark.parametrize("kw, message", [
    ({"method": "eagle3"}, "needs speculative_config method 'dflash', got 'eagle3'"),
    ({"async_scheduling": True}, "needs synchronous scheduling"),
    ({"mrope": True}, "M-RoPE targets are not supported"),
])
def test_check_config_refuses(kw, message):
    with pytest.raises(plugin.PluginError, match=message):
        plugin.check_config(config(**kw))
