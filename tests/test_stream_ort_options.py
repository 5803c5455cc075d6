"""ONNX Runtime sessions configured for serving: spinning off unless asked, intra-op threads from
the cores and the number of models, both settable in the server's config."""

from __future__ import annotations

import pytest

from xaiserve.service.config import ConfigError, load_config
from xaiserve.service.registry import OnnxModel, Registry, RegistryConfig, available_cores, serving_intra_op_threads


def options(model: OnnxModel):
    return model.session.get_session_options()


@pytest.mark.parametrize("spin", [False, True])
def test_spinning_is_off_unless_asked(tiny_store, spin):
    m = OnnxModel(tiny_store / "tiny-nemu/1/model.onnx", intra_op_threads=1, allow_spinning=spin)
    so = options(m)
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert so.get_session_config_entry(key) == ("1" if spin else "0")
    assert so.intra_op_num_threads == 1


def test_serving_threads_share_the_cores_between_the_calls_that_can_run_at_once():
    assert serving_intra_op_threads(cores=2, models=8, concurrent_calls=2) == 1
    assert serving_intra_op_threads(cores=8, models=1, concurrent_calls=2) == 8  # one model: one call at a time
    assert serving_intra_op_threads(cores=8, models=5, concurrent_calls=2) == 4
    assert serving_intra_op_threads(cores=1, models=3, concurrent_calls=4) == 1
    assert serving_intra_op_threads(cores=4, models=0, concurrent_calls=2) == 4
    assert 1 <= available_cores()


def test_the_registry_of_a_server_picks_them_and_an_explicit_count_wins(tiny_store):
    models = sum(1 for e in Registry(RegistryConfig(store=tiny_store)).entries() if "onnx" in e.files)
    auto = Registry(RegistryConfig(store=tiny_store, concurrent_calls=2))
    assert auto.onnx_intra_op_threads() == serving_intra_op_threads(available_cores(), models, 2)
    assert options(auto.onnx("tiny-nemu")).intra_op_num_threads == auto.onnx_intra_op_threads()
    assert (
        Registry(RegistryConfig(store=tiny_store, concurrent_calls=2, intra_op_threads=3)).onnx_intra_op_threads() == 3
    )
    assert (
        Registry(RegistryConfig(store=tiny_store)).onnx_intra_op_threads() == 0
    )  # not a server: the runtime's default


def test_server_settings():
    cfg = load_config(None, env={"XAISERVE_ORT_SPINNING": "yes"}, flags={"intra_op_threads": "2"})
    assert cfg.ort_spinning is True and cfg.intra_op_threads == 2
    assert load_config(None, env={}).ort_spinning is False
    assert load_config(None, env={}).stream_max_consecutive_errors == 10
    with pytest.raises(ConfigError, match="stream_max_consecutive_errors must be >= 1"):
        load_config(None, env={}, stream_max_consecutive_errors=0)
