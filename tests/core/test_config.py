"""core.config: layering, strict keys, coercion, hashing, YAML loading."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from core import config
from core.config import ConfigError


@dataclass
class Inner:
    lr: float = 1e-4  # learning rate
    steps: int = 10  # steps


@dataclass
class Outer:
    name: str = "x"  # a name
    inner: Inner = field(default_factory=Inner)  # nested section
    tags: list[str] = field(default_factory=list)  # free labels
    limit: float | None = None  # optional

    def __post_init__(self) -> None:
        if self.inner.steps < 0:
            raise ValueError("steps must be >= 0")


def test_unset_flags_are_not_given_but_null_is_a_value():
    flags = config.given({"a": None, "b": {"c": 5, "e": None}, "f": {"g": None}})
    assert flags == {"b": {"c": 5}}  # a typer option left at its default overrides nothing
    assert config.deep_merge({"a": 1, "b": {"c": 2, "d": 3}}, flags, None) == {"a": 1, "b": {"c": 5, "d": 3}}
    # `aesthetic: null` in pipelines.yaml or `--set aesthetic=null`: the rule is switched off
    assert config.deep_merge({"aesthetic": 4.5}, {"aesthetic": None}) == {"aesthetic": None}
    assert config.deep_merge({"text": {"checkpoint": "x"}}, config.parse_sets(["text.checkpoint=null"])) == {"text": {"checkpoint": None}}
    assert config.deep_merge({"a": {"x": 1}}, {"a": 2}) == {"a": 2}  # a scalar replaces a mapping


def test_precedence_defaults_yaml_cli():
    cfg = config.merge(Outer, {"name": "yaml", "inner": {"lr": 0.1}}, config.given({"inner": {"lr": None, "steps": 3}}))
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps) == ("yaml", 0.1, 3)
    assert config.merge(Outer).inner.lr == 1e-4


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"Outer: unknown key 'nme' \(allowed: inner, limit, name, tags\)"):
        config.build(Outer, {"nme": 1})
    with pytest.raises(ConfigError, match=r"here.inner: unknown key 'lrr' \(allowed: lr, steps\)"):
        config.build(Outer, {"inner": {"lrr": 1}}, where="here")


def test_coercion():
    cfg = config.build(Outer, {"name": 5, "inner": {"lr": 1, "steps": 4.0}, "tags": ["a", 1], "limit": 2})
    assert cfg.name == "5" and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.steps == 4 and isinstance(cfg.inner.steps, int)
    assert cfg.tags == ["a", "1"] and cfg.limit == 2.0
    assert config.build(Outer, {"inner": {"lr": "1e-4"}}).inner.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(ConfigError, match="inner.steps: expected int, got 'many'"):
        config.build(Outer, {"inner": {"steps": "many"}})
    with pytest.raises(ConfigError, match="expected int, got 2.5"):
        config.build(Outer, {"inner": {"steps": 2.5}})


def test_post_init_errors_become_config_errors():
    with pytest.raises(ConfigError, match="Outer: steps must be >= 0"):
        config.build(Outer, {"inner": {"steps": -1}})


def test_hash_is_stable_and_sensitive():
    a, b = config.build(Outer, {"name": "a"}), config.build(Outer, {"name": "a"})
    assert config.config_hash(a) == config.config_hash(b) == config.config_hash(config.to_dict(a))
    assert config.config_hash(a) != config.config_hash(config.build(Outer, {"name": "b"}))
    assert len(config.config_hash(a)) == 16
    assert "name: a" in config.dump_yaml(a)


def test_load_yaml_and_section(tmp_path, monkeypatch):
    p = tmp_path / "p.yaml"
    p.write_text("curate:\n  filter:\n    aesthetic: 5\n")
    doc = config.load_yaml(p)
    assert config.section(doc, "curate.filter") == {"aesthetic": 5}
    assert config.section(doc, "curate.dedup") == {}
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.section({"a": {"b": 3}}, "a.b")
    with pytest.raises(ConfigError, match="inside a non-mapping"):
        config.section({"a": 3}, "a.b")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config.load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        config.load_yaml(tmp_path / "none.yaml")
    monkeypatch.chdir(tmp_path)
    assert config.pipelines_path() == config.REPO_PIPELINES  # no ./pipelines.yaml here
    (tmp_path / "pipelines.yaml").write_text("{}\n")
    assert config.pipelines_path().resolve() == (tmp_path / "pipelines.yaml").resolve()


def test_parse_sets():
    assert config.parse_sets(["optim.lr=3e-4", "steps=10", "name=abc"]) == {"optim": {"lr": 3e-4}, "steps": 10, "name": "abc"}
    with pytest.raises(ConfigError, match="--set expects key=value"):
        config.parse_sets(["oops"])


def test_numeric_text_is_accepted_for_numeric_fields() -> None:
    """YAML reads `3e-4` as a string; `--set optim.lr=3e-4` must still mean 0.0003."""
    from dataclasses import dataclass

    from core.config import ConfigError, build, parse_sets

    @dataclass
    class Optim:
        lr: float = 1.0e-4
        steps: int = 10

    assert build(Optim, parse_sets(["lr=3e-4", "steps=20"])) == Optim(lr=3e-4, steps=20)
    with pytest.raises(ConfigError, match="Optim.lr: expected float"):
        build(Optim, {"lr": "fast"})


def test_yaml_booleans_are_only_true_and_false(tmp_path) -> None:
    # YAML 1.1 would read `on: hash` (curate join's key) as {True: "hash"} and `no` as False.
    p = tmp_path / "pipelines.yaml"
    p.write_text("curate:\n  join:\n    on: hash\n    missing: no\n    flag: true\n    other: False\n")
    assert config.section(config.load_yaml(p), "curate.join") == {"on": "hash", "missing": "no", "flag": True, "other": False}
    assert config.parse_sets(["curate.join.on=off"]) == {"curate": {"join": {"on": "off"}}}
