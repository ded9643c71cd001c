"""The repository's pipelines.yaml is valid as shipped: every section builds its config (a stale
or misspelt key, `null` included, is an error), every named pipeline plans, every stage loads."""
from __future__ import annotations

import pytest

from core import config
from curate import pipeline
from curate.steps import STEP_MODULES, get_step

DOC = config.load_yaml(config.REPO_PIPELINES)


@pytest.mark.parametrize("name", sorted(STEP_MODULES))
def test_every_curate_section_builds(name: str) -> None:
    step = get_step(name)
    required = {"captions": {"captions": "x.parquet"}, "join": {"table": "t.parquet"}}  # the tables they merge
    overrides = required.get(name, {})
    config.merge(step.config, config.section(DOC, step.section), overrides, where=step.section)


@pytest.mark.parametrize("name", sorted(config.section(DOC, "pipelines")))
def test_every_pipeline_plans(name: str) -> None:
    pipeline.plan(DOC, name)


def test_pretokenize_and_train_sections_build() -> None:
    from pretokenize.check import CheckConfig
    from pretokenize.fitvq import FitVQConfig
    from pretokenize.run import PretokenizeConfig
    from train.stages import load_stage, stage_names

    section = config.section(DOC, "pretokenize")
    config.merge(PretokenizeConfig, {k: v for k, v in section.items() if k not in ("check", "fit_vq")})
    config.merge(CheckConfig, config.section(section, "check"))
    config.merge(FitVQConfig, config.section(section, "fit_vq"))
    for stage in stage_names(DOC):
        load_stage(stage, config.REPO_PIPELINES)
