"""DaemonConfig: defaults, HELIX_* parsing, and loud failures on bad values."""

from __future__ import annotations

import pytest

from helix_daemon.config import DaemonConfig, default_daemon_id


def test_defaults_give_a_stable_daemon_id() -> None:
    """Without an explicit id the name is host:queue:index, the same on every restart."""
    config = DaemonConfig(queue="q1", daemon_index=2)
    assert config.daemon_id == default_daemon_id("q1", 2) and config.daemon_id.endswith(":q1:2")
    assert DaemonConfig(queue="q1", daemon_index=2).daemon_id == config.daemon_id


def test_from_env_reads_every_kind_of_field() -> None:
    """Ints, floats, bools, optional ints and strings all come from HELIX_<FIELD>."""
    env = {"HELIX_MODEL": "/m", "HELIX_LEASE_MS": "1500", "HELIX_RECLAIM_INTERVAL_S": "0.25",
           "HELIX_LOG_JSON": "false", "HELIX_NUM_KV_BLOCKS": "64", "HELIX_DAEMON_ID": "d7",
           "HELIX_KV_CACHE_MEMORY": "0.5", "HELIX_TORCH_THREADS": "1", "HELIX_CPU_LINEAR": "blas",
           "UNRELATED": "x"}
    config = DaemonConfig.from_env(env)
    assert (config.model, config.lease_ms, config.reclaim_interval_s) == ("/m", 1500, 0.25)
    assert config.log_json is False and config.num_kv_blocks == 64 and config.daemon_id == "d7"
    assert config.kv_cache_bytes_or_fraction == 0.5 and config.torch_threads == 1
    assert config.cpu_linear == "blas"
    assert DaemonConfig.from_env({"HELIX_NUM_KV_BLOCKS": "none"}).num_kv_blocks is None


def test_overrides_win_over_the_environment() -> None:
    """Keyword overrides (CLI flags) replace what the environment says."""
    config = DaemonConfig.from_env({"HELIX_QUEUE": "env"}, queue="flag")
    assert config.queue == "flag"


@pytest.mark.parametrize("name, value, message", [
    ("LEASE_MS", "soon", "HELIX_LEASE_MS='soon' is not a valid int"),
    ("LEASE_MS", "0", "lease_ms must be > 0, got 0"),
    ("MAX_ATTEMPTS", "-1", "max_attempts must be > 0, got -1"),
    ("LOG_JSON", "maybe", "HELIX_LOG_JSON='maybe' is not a valid bool"),
    ("RECLAIM_INTERVAL_S", "1s", "HELIX_RECLAIM_INTERVAL_S='1s' is not a valid float"),
    ("QUEUE", "a{b}", "queue: .*no '{' or '}'"),
    ("KV_CACHE_MEMORY", "lots", "kv_cache_memory: not 'auto' or a number: 'lots'"),
    ("METRICS_PORT", "70000", "metrics_port must be in 0..65535"),
    ("DRAIN_TIMEOUT_S", "-1", "drain_timeout_s must be >= 0"),
    ("NUM_KV_BLOCKS", "0", "num_kv_blocks must be >= 1"),
    ("TORCH_THREADS", "0", "torch_threads must be >= 1"),
    ("CPU_LINEAR", "fast", "cpu_linear must be one of auto, onednn, blas, got 'fast'"),
    ("QUANTIZATION", "int3", "quantization must be one of none, int8, int4, auto, got 'int3'"),
    ("DRAFT_QUANTIZATION", "int3", "draft_quantization must be one of target, none, int8, int4, "
                                   "auto, got 'int3'"),
])
def test_bad_values_raise(name: str, value: str, message: str) -> None:
    """A value that does not parse or is out of range raises ValueError naming the setting and
    what is wrong with it, never a silent default."""
    with pytest.raises(ValueError, match=message):
        DaemonConfig.from_env({f"HELIX_{name}": value})


def test_heartbeat_ttl_covers_three_beats() -> None:
    """The heartbeat key outlives two missed beats."""
    assert DaemonConfig(heartbeat_interval_s=2).heartbeat_ttl_ms == 6000


def test_torch_threads_reach_torch_when_the_engine_loads(tiny_model_path) -> None:
    """torch_threads (HELIX_TORCH_THREADS, --torch-threads) sets torch's kernel thread count;
    cpu_linear (HELIX_CPU_LINEAR, --cpu-linear) reaches the model runner."""
    import torch

    from helix_daemon.engine_host.load import load_engine

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        config = DaemonConfig(model=str(tiny_model_path), device="cpu", num_kv_blocks=16,
                              torch_threads=1, cpu_linear="blas")
        engine = load_engine(config.engine_config())
        assert torch.get_num_threads() == 1
        assert engine.target.linear_form == "blas"
    finally:
        torch.set_num_threads(before)


def test_quantization_reaches_the_engine_and_its_info(tiny_model_path) -> None:
    """HELIX_QUANTIZATION (--quantization) reaches the model runner through the engine config;
    with ``--dtype auto`` on CPU the model serves in bfloat16, and the engine's info (what the
    daemon logs and heartbeats) carries the mode and the smaller weight bytes; ``auto`` on a
    folder is ``none``."""
    import torch

    from helix_daemon.engine_host.load import load_engine

    def engine(quantization: str):  # noqa: ANN202
        config = DaemonConfig.from_env({"HELIX_QUANTIZATION": quantization},
                                       model=str(tiny_model_path), device="cpu",
                                       num_kv_blocks=16)
        return load_engine(config.engine_config())

    plain, int4, auto = engine("none"), engine("int4"), engine("auto")
    assert int4.target.quantization == "int4" and int4.target.dtype == torch.bfloat16
    assert plain.target.dtype == torch.float32
    # a folder has no quantization of its own to keep: auto serves it as none
    assert auto.info().quantization == "none" and auto.target.dtype == torch.float32
    assert int4.info().quantization == "int4"
    assert 0 < int4.info().weight_bytes < plain.info().weight_bytes / 4
