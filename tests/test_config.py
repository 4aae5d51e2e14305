"""Config: EMBEDDER_* env vars parsed by field type, validated, and overridden by explicit values."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from embedder import Config


def test_defaults():
    cfg = Config.from_env({})
    assert cfg == Config()
    assert (cfg.model, cfg.device, cfg.runtime, cfg.precision) == ("mobilenet_v2", "auto", "auto", "fp32")
    assert cfg.normalize is True and cfg.max_pixels == 64_000_000 and cfg.micro_batch == 0


def test_env_values_are_parsed_by_type():
    cfg = Config.from_env({
        "EMBEDDER_MODEL": "efficientnet_lite2",  # str
        "EMBEDDER_MAX_PIXELS": "1000000",  # int
        "EMBEDDER_MICRO_BATCH": " 8 ",
        "EMBEDDER_MAX_DELAY_MS": "2.5",  # float
        "EMBEDDER_NORMALIZE": "false",  # bool
        "EMBEDDER_COMPILE": "Yes",
        "EMBEDDER_CACHE_DIR": "/tmp/embedder-test-cache",  # Path
        "EMBEDDER_DATA_DIR": "~/data",
        "EMBEDDER_PRECISION": "bf16",
        "UNRELATED": "ignored",
        "EMBEDDER_NOT_A_FIELD": "ignored",
    })
    assert cfg.model == "efficientnet_lite2"
    assert cfg.max_pixels == 1_000_000 and cfg.micro_batch == 8
    assert cfg.max_delay_ms == 2.5 and isinstance(cfg.max_delay_ms, float)
    assert cfg.normalize is False and cfg.compile is True
    assert cfg.cache_dir == Path("/tmp/embedder-test-cache")
    assert cfg.data_dir == Path("~/data").expanduser() and isinstance(cfg.data_dir, Path)
    assert cfg.precision == "bf16"


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("ON", True), ("yes", True),
                                        ("0", False), ("False", False), ("off", False), (" no ", False)])
def test_bool_spellings(raw, value):
    assert Config.from_env({"EMBEDDER_NORMALIZE": raw}).normalize is value


def test_reads_the_process_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDDER_RUNTIME", "openvino")
    monkeypatch.setenv("EMBEDDER_CACHE_DIR", str(tmp_path))
    cfg = Config.from_env()
    assert cfg.runtime == "openvino" and cfg.cache_dir == tmp_path


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("EMBEDDER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Config.from_env().cache_dir == tmp_path / "embedder"


@pytest.mark.parametrize("var, raw, kind", [
    ("EMBEDDER_MAX_BATCH", "lots", "int"),
    ("EMBEDDER_MAX_PIXELS", "1e6", "int"),
    ("EMBEDDER_MAX_DELAY_MS", "fast", "float"),
    ("EMBEDDER_NORMALIZE", "maybe", "bool"),
    ("EMBEDDER_COMPILE", "", "bool"),
])
def test_invalid_env_values_name_the_variable(var, raw, kind):
    with pytest.raises(ValueError, match=f"^{var}={raw!r} is not a valid {kind}$"):
        Config.from_env({var: raw})


def test_explicit_values_beat_env_and_none_does_not():
    env = {"EMBEDDER_MODEL": "efficientnet_lite0", "EMBEDDER_MAX_BATCH": "8", "EMBEDDER_NORMALIZE": "0",
           "EMBEDDER_DEVICE": "cpu"}
    cfg = Config.from_env(env, model="mobilenet_v2", max_batch=32, normalize=True, device=None)
    assert (cfg.model, cfg.max_batch, cfg.normalize) == ("mobilenet_v2", 32, True)
    assert cfg.device == "cpu"  # None means "not given": the env value stays


def test_explicit_override_wins_even_when_env_is_invalid():
    """An override replaces the env value, but a malformed env var is still reported (fail loudly)."""
    with pytest.raises(ValueError, match="EMBEDDER_MAX_BATCH"):
        Config.from_env({"EMBEDDER_MAX_BATCH": "x"}, max_batch=4)


@pytest.mark.parametrize("field, value, message", [
    ("max_batch", 0, "max_batch must be >= 1"),
    ("max_pixels", -1, "max_pixels must be >= 1"),
    ("max_items", 0, "max_items must be >= 1"),
    ("micro_batch", -1, "micro_batch must be >= 0"),
    ("decode_workers", -2, "decode_workers must be >= 0"),
    ("runtime_threads", -1, "runtime_threads must be >= 0"),
    ("precision", "int8", "precision must be 'fp32' or 'bf16'"),
    ("port", -1, "port must be a TCP port, 0-65535"),
    ("port", 70000, "port must be a TCP port, 0-65535"),
    ("metrics_port", -3, "metrics_port must be a TCP port"),
    ("max_delay_ms", -5, "max_delay_ms must be >= 0"),
    ("grace_seconds", -1, "grace_seconds must be >= 0"),
    ("cache_max_items", -1, "cache_max_items must be >= 0"),
    ("max_metadata_bytes", 0, "max_metadata_bytes must be >= 1"),
    ("max_metadata_bytes", 128 * 2**20, "max_metadata_bytes .* must be at most max_message_bytes"),
])
def test_out_of_range_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        Config(**{field: value})
    with pytest.raises(ValueError, match=message):
        Config.from_env({f"EMBEDDER_{field.upper()}": str(value)})


def test_paths_are_expanded_and_replace_revalidates(tmp_path):
    cfg = Config(cache_dir="~/x", data_dir=str(tmp_path))
    assert cfg.cache_dir == Path("~/x").expanduser() and cfg.data_dir == tmp_path
    with pytest.raises(ValueError, match="max_batch"):
        dataclasses.replace(cfg, max_batch=0)


def test_every_field_has_an_env_var():
    """Each field can be set from the environment: EMBEDDER_<FIELD>, parsed to the field's type."""
    ports = {"port": 7, "metrics_port": 8, "http_port": 9}  # each listener its own
    env = {"EMBEDDER_" + f.name.upper(): str(ports.get(f.name, 7)) for f in dataclasses.fields(Config)
           if f.type in ("int", "float")}
    cfg = Config.from_env(env)
    for f in dataclasses.fields(Config):
        if f.type in ("int", "float"):
            assert getattr(cfg, f.name) == ports.get(f.name, 7), f.name
    assert {f.type for f in dataclasses.fields(Config)} <= {"str", "int", "float", "bool", "Path"}


def test_listeners_need_ports_of_their_own():
    with pytest.raises(ValueError, match="must differ"):
        Config(port=8080, http_port=8080)
    with pytest.raises(ValueError, match="must differ"):
        Config(port=0, metrics_port=9100, http_port=9100)
    assert Config(port=0, http_port=8080).http_port == 8080  # port 0 picks a free one: no clash


def test_the_readme_lists_every_config_field():
    """The README's configuration table names every Config field, and nothing else."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Benchmarks")]
    documented = {name for row in table.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == {f.name for f in dataclasses.fields(Config)}
