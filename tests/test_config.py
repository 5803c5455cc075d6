"""One parser for every configuration source: flags, XAISERVE_* environment, config files, code.

A value is accepted or refused by the same rules whatever its source, and a refusal names the
setting and the source. The CLI is driven in-process through `xaiserve.service.cli.main` (the
same entry point as the console script), plus one real subprocess for the case a user types.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.serverutil import ROOT
from xaiserve.service import cli
from xaiserve.service.config import ConfigError, ServerConfig, load_config, parse_setting
from xaiserve.service.worker import WorkerConfig, load_worker_config


def serve(argv: list[str], capsys) -> tuple[int, str, str]:
    """`xaiserve serve ARGV --print-config` in-process: (exit code, stdout, stderr)."""
    rc = cli.main(["serve", *argv, "--print-config"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def clean_env(monkeypatch):
    """No XAISERVE_* variable of the developer's shell leaks into a test."""
    import os

    for k in list(os.environ):
        if k.startswith("XAISERVE_"):
            monkeypatch.delenv(k)
    return monkeypatch


def _sources(tmp_path, setting: str, text: str):
    """The three ways a user gives `setting` = `text`: (label in the error, argv, env)."""
    f = tmp_path / "c.yaml"
    f.write_text(f"{setting}: {text}\n")
    return [
        (f"flag --{setting.replace('_', '-')}", [f"--{setting.replace('_', '-')}", text], {}),
        (f"environment XAISERVE_{setting.upper()}", [], {f"XAISERVE_{setting.upper()}": text}),
        (f"config file {f}", ["--config", str(f)], {}),
    ]


@pytest.mark.parametrize(
    "setting,text,what",
    [
        ("prefer_cuda", "maybe", "a boolean"),
        ("spiral_runtime", "2", "a boolean"),
        ("max_batch", "eight", "an integer"),
        ("max_batch", "8.5", "an integer"),
        ("port", "1e3", "an integer"),  # (YAML itself reads 0x10 as the number 16)
        ("max_delay_ms", "fast", "a finite number"),
        ("grace_s", "nan", "a finite number"),
        ("load_models", "eager", "one of all, lazy"),
    ],
)
def test_a_bad_value_fails_alike_from_every_source_and_names_setting_and_source(
    setting, text, what, tmp_path, clean_env, capsys
):
    for source, argv, env in _sources(tmp_path, setting, text):
        for k, v in env.items():
            clean_env.setenv(k, v)
        rc, out, err = serve(argv, capsys)
        for k in env:
            clean_env.delenv(k)
        assert rc == 2 and out == "", (source, err)
        assert f"setting {setting} ({source})" in err and what in err, err


@pytest.mark.parametrize(
    "text,value",
    [
        ("true", True),
        ("Yes", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("NO", False),
        ("off", False),
        ("0", False),
    ],
)
def test_booleans_read_the_same_from_every_source(text, value, tmp_path, clean_env, capsys):
    seen = []
    for source, argv, env in _sources(tmp_path, "prefer_cuda", text):
        for k, v in env.items():
            clean_env.setenv(k, v)
        rc, out, err = serve(argv, capsys)
        for k in env:
            clean_env.delenv(k)
        assert rc == 0, (source, err)
        seen.append(json.loads(out)["prefer_cuda"])
    assert seen == [value] * 3


def test_numbers_read_the_same_from_every_source(tmp_path, clean_env, capsys):
    for source, argv, env in _sources(tmp_path, "max_delay_ms", " 2.5 "):
        for k, v in env.items():
            clean_env.setenv(k, v)
        rc, out, err = serve(argv, capsys)
        for k in env:
            clean_env.delenv(k)
        assert rc == 0 and json.loads(out)["max_delay_ms"] == 2.5, (source, err)


def test_native_file_values_follow_the_text_rules(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"max_batch": 4, "prefer_cuda": 0, "grace_s": 3, "host": "0.0.0.0"}))
    cfg = load_config(f, env={})
    assert (cfg.max_batch, cfg.prefer_cuda, cfg.grace_s) == (4, False, 3.0) and isinstance(cfg.grace_s, float)
    for bad, what in [
        ({"max_batch": True}, "an integer"),
        ({"max_batch": 4.0}, "an integer"),
        ({"prefer_cuda": 2}, "a boolean"),
        ({"grace_s": "inf"}, "a finite number"),
        ({"tls_cert": None}, "set (an empty value)"),
        ({"log_level": ["INFO"]}, "text"),
    ]:
        f.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=r"setting \w+ \(config file .*c\.json\)") as e:
            load_config(f, env={})
        assert what in str(e.value) and e.value.source == f"config file {f}"


def test_an_empty_environment_variable_is_an_error_not_a_zero(clean_env, capsys):
    clean_env.setenv("XAISERVE_PORT", "")
    rc, _, err = serve([], capsys)
    assert rc == 2 and "setting port (environment XAISERVE_PORT): '' is not an integer" in err


def test_rules_across_settings_name_where_each_value_came_from(tmp_path, clean_env, capsys):
    rc, _, err = serve(["--max-batch", "0"], capsys)
    assert rc == 2 and "max_batch must be >= 1 (max_batch from flag --max-batch)" in err
    f = tmp_path / "c.yaml"
    f.write_text("stream_default_queue: 100\n")
    clean_env.setenv("XAISERVE_STREAM_MAX_QUEUE", "10")
    rc, _, err = serve(["--config", str(f)], capsys)
    assert (
        rc == 2
        and "stream_default_queue from config file" in err
        and "stream_max_queue from environment XAISERVE_STREAM_MAX_QUEUE" in err
    )
    rc, _, err = serve(["--port", "70000"], capsys)
    assert rc == 2 and "port must be in 0..65535" in err


def test_precedence_defaults_file_environment_flags(tmp_path, clean_env, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("max_batch: 8\nport: 6000\nmax_queue: 9\n")
    clean_env.setenv("XAISERVE_MAX_BATCH", "4")
    clean_env.setenv("XAISERVE_PORT", "6500")
    rc, out, err = serve(["--config", str(f), "--port", "7000"], capsys)
    cfg = json.loads(out)
    assert rc == 0 and (cfg["max_queue"], cfg["max_batch"], cfg["port"], cfg["metrics_port"]) == (9, 4, 7000, 9100)
    assert cfg["model_store"] == "model_store"  # the working directory's ./model_store, not a path into the package


def test_a_long_bad_value_is_quoted_in_at_most_200_characters(clean_env, capsys):
    rc, _, err = serve(["--prefer-cuda", "x" * 10_000], capsys)
    assert rc == 2 and "10000 characters" in err and len(err) < 600


def test_lists_split_on_commas_or_come_as_a_list():
    t = tuple[str, ...]
    assert parse_setting("methods", " relax, ablation_path ,", t, "flag --methods") == ("relax", "ablation_path")
    assert parse_setting("methods", ["relax"], t, "config file w.yaml") == ("relax",)
    with pytest.raises(ConfigError, match=r"setting methods \(config file w\.yaml\): \{'a': 1\} is not a list"):
        parse_setting("methods", {"a": 1}, t, "config file w.yaml")
    with pytest.raises(ConfigError, match=r"setting methods\[1\] \(config file w\.yaml\): True is not text"):
        parse_setting("methods", ["relax", True], t, "config file w.yaml")


def test_the_worker_reads_flags_environment_and_file_with_the_same_parser(tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("methods: [relax]\nconcurrency: 2\nlog_json: off\n")
    cfg = load_worker_config(
        ["--config", str(f), "--grace-s", "4"],
        env={"XAISERVE_QUEUE": "redis://q:6379/0", "XAISERVE_MODEL_STORE": "/models", "XAISERVE_METRICS_PORT": "1"},
    )  # a server variable: not the worker's
    assert cfg == WorkerConfig(
        queue="redis://q:6379/0", model_store="/models", methods=("relax",), concurrency=2, grace_s=4.0, log_json=False
    )
    flags = load_worker_config(["--queue", "sqlite:///x", "--methods", "relax,ablation_path", "--store", "s"], env={})
    assert flags.methods == ("relax", "ablation_path") and flags.model_store == "s"
    f.write_text("log_json: maybe\n")
    with pytest.raises(ConfigError, match=r"setting log_json \(config file .*w\.yaml\): 'maybe' is not a boolean"):
        load_worker_config(["--config", str(f), "--queue", "sqlite:///x"], env={})


def test_worker_flags_fail_with_the_setting_and_the_flag(capsys):
    from xaiserve.service import worker

    for argv, msg in [
        (
            ["--queue", "sqlite:///x", "--concurrency", "two"],
            "setting concurrency (flag --concurrency): 'two' is not an integer",
        ),
        (
            ["--queue", "sqlite:///x", "--metrics-port", "1.5"],
            "setting metrics_port (flag --metrics-port): '1.5' is not an integer",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            worker.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    # rules beyond one value's type: exit 2 with the setting and its source
    assert worker.main(["--queue", "sqlite:///x", "--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1 (from flag --concurrency)" in capsys.readouterr().err
    assert worker.main(["--queue", "sqlite:///x", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "device 'gpu'" in err and "(from flag --device)" in err


@pytest.mark.slow
def test_prefer_cuda_maybe_fails_in_a_real_process_as_the_environment_does():
    """The case a user types: before, `--prefer-cuda maybe` silently meant false."""
    base = [sys.executable, "-m", "xaiserve.service.cli", "serve", "--print-config"]
    env = {"PATH": "/usr/bin:/bin"}
    flag = subprocess.run(
        [*base, "--prefer-cuda", "maybe"], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env
    )
    envr = subprocess.run(
        base, capture_output=True, text=True, cwd=ROOT, timeout=60, env={**env, "XAISERVE_PREFER_CUDA": "maybe"}
    )
    assert flag.returncode == envr.returncode == 2 and flag.stdout == envr.stdout == ""
    assert "setting prefer_cuda (flag --prefer-cuda): 'maybe' is not a boolean" in flag.stderr
    assert "setting prefer_cuda (environment XAISERVE_PREFER_CUDA): 'maybe' is not a boolean" in envr.stderr


def test_every_field_has_a_type_the_parser_reads():
    import typing

    for cls in (ServerConfig, WorkerConfig):
        for name, hint in typing.get_type_hints(cls).items():
            default = getattr(cls(), name)
            text = ",".join(default) if isinstance(default, tuple) else "" if default is None else str(default)
            if default is None:
                assert parse_setting(name, None, hint, "test") is None
            else:
                assert parse_setting(name, text, hint, "test") == default, name
