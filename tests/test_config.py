"""common/config.py, the config layer of every CLI: `--config FILE`, repeated `--set key=value`, `--help`
listing every key with its default, and one line naming the key and its source (exit 2) for an unknown key
or a bad value. The CLIs run as subprocesses; each error happens before any work."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from common.config import ConfigError, build_parser, load, merged, option, parse

from tests.conftest import REPO

# cli -> (command, a bad value as key=value, help lines that must appear)
CLIS = {
    "train": (["train.py"], "micro_batch=abc", ["micro_batch = 8  (int)", "lr = 0.0005  (float)",
                                                 "text_mode = rewrite  (str) [original|rewrite|all]"]),
    "eval": (["eval.py"], "batch_size=big", ["batch_size = 256  (int)", "format = laclip  (str)"]),
    "pack": (["-m", "packing"], "max_side=big", ["max_side = 256  (int)", "keep_images = false  (bool)"]),
    "rewrite": (["-m", "rewrite"], "engine=gpt", ["engine = vllm  (str)", "shard_size = 1000  (int)"]),
    "demo": (["scripts/demo.py"], "seeds=many", ["seeds = 1  (int)", "steps = 300  (int)"]),
    "benchmarks": (["-m", "benchmarks", "store"], "level=high", ["level = 12  (int)", "seconds = 1.0  (float)"]),
    "fidelity": (["-m", "rewrite.fidelity"], "batch_size=big", ["batch_size = 256  (int)", "progress = true  (bool)"]),
    "make_rewrites": (["scripts/make_rewrites.py"], "ranks=two", ["ranks = 1  (int)"]),
    "datasets": (["-m", "packing.builders"], "name=cifar", ["image_size = 256  (int)", "workers = 2  (int)"]),
}


def run_cli(command: list[str], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def one_line_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# Four launches each of CLIs that take 1.3 to 2.2 s to reach their parser (the others: 0.1 s): 5.4 to
# 6.9 s a case on 2 cores, slow.
SLOW_TO_START = {"train", "eval", "pack", "benchmarks"}


@pytest.mark.parametrize("cli", [pytest.param(cli, marks=pytest.mark.slow) if cli in SLOW_TO_START else cli
                                 for cli in sorted(CLIS)])
def test_unknown_key_and_bad_value(cli, tmp_path):
    command, bad, _ = CLIS[cli]
    bad_key, bad_value = bad.split("=")
    unknown = one_line_error(run_cli(command, "--set", "no_such_key=1"), "'no_such_key'", "from --set")
    assert "unknown config key" in unknown
    one_line_error(run_cli(command, "--set", bad), f"'{bad_key}'", "from --set")
    typo = tmp_path / "typo.yaml"
    typo.write_text("no_such_key: 1\n")
    one_line_error(run_cli(command, "--config", str(typo)), "'no_such_key'", f"from {typo}")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f"{bad_key}: {bad_value}\n")
    one_line_error(run_cli(command, "--config", str(wrong)), f"'{bad_key}'", f"from {wrong}")


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_help_lists_keys_with_defaults(cli):
    command, _, expected = CLIS[cli]
    res = run_cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert "--config" in res.stdout and "--set" in res.stdout
    for line in expected:
        assert line in res.stdout, (line, res.stdout)


# ----------------------------------------------------------------------------- the layer itself, in process

@dataclasses.dataclass
class Example:
    name: str = option("x", help="a string")
    count: int = option(2, help="an int")
    rate: float = option(0.5, help="a float")
    flag: bool = option(False, help="a bool")
    limit: int | None = option(None, help="an optional int")
    items: list[str] = option(factory=lambda: ["a"], help="a list", choices=("a", "b", "c"))
    extra: dict = option(factory=dict, help="a mapping")
    mode: str = option("fast", help="one of two", choices=("fast", "slow"))

    def validate(self):
        if self.count < 0:
            raise ConfigError("count", "must be >= 0")


def test_load_types_order_and_sources(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("count: 3\nrate: 1e-3\nitems: [b, c]\nlimit: 7\n")
    cfg = load(Example, str(path), ["count=4", "flag=yes", "limit=null", "name=007", "extra={k: [1, 2]}",
                                    "items=a,b"])
    assert (cfg.count, cfg.rate, cfg.flag, cfg.limit, cfg.name) == (4, 1e-3, True, None, "007")
    assert cfg.items == ["a", "b"] and cfg.extra == {"k": [1, 2]}
    with pytest.raises(ConfigError, match=r"'items' from --set: 'd' is not one of a, b, c"):
        load(Example, None, ["items=[a, d]"])
    with pytest.raises(ConfigError, match=r"'count' from .*c.yaml: cannot read 2.5 as int"):
        path.write_text("count: 2.5\n")
        load(Example, str(path))
    with pytest.raises(ConfigError, match=r"'count' from --set: must be >= 0"):  # validate() names the source
        load(Example, None, ["count=-1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'mod' from --set \(did you mean 'mode'\?\)"):
        load(Example, None, ["mod=slow"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load(Example, None, ["mode"])


def test_parser_flags_and_one_line_exit(capsys):
    parser = build_parser(Example, "example", flags=["count", "flag", "items"])
    cfg, _ = parse(Example, parser, ["--count", "5", "--flag", "--items", "a,b", "c", "--set", "count=6"])
    assert (cfg.count, cfg.flag, cfg.items) == (6, True, ["a", "b", "c"])  # --set after the flags
    with pytest.raises(SystemExit) as exit_:
        parse(Example, build_parser(Example, "example", flags=["count"]), ["--count", "many"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "example: error: config key 'count' from --count: cannot read 'many' as int\n"


def test_nested_merge_keeps_other_keys_and_shares_nothing():
    """The one nested merge (model_overrides over a model config, a run's deepspeed: over the generated one)."""
    base = {"vision_cfg": {"width": 64, "layers": 2}, "embed_dim": 32, "tags": ["a"]}
    out = merged(base, {"vision_cfg": {"qk_norm": True}, "embed_dim": 16})
    assert out == {"vision_cfg": {"width": 64, "layers": 2, "qk_norm": True}, "embed_dim": 16, "tags": ["a"]}
    out["vision_cfg"]["width"] = 0
    out["tags"].append("b")
    assert base == {"vision_cfg": {"width": 64, "layers": 2}, "embed_dim": 32, "tags": ["a"]}
