"""Typed config: layers, provenance and one-line errors naming key, source and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_repo_toml_documents_exactly_the_defaults():
    from_file = load_config(REPO / "likerank.toml", env={})
    assert from_file.to_dict() == Config().to_dict()


def test_layers_file_then_env_then_flag(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("[labeling]\ngroup_size = 50\ntag_bonus = 1\n[source]\nhashtags = ['selfie', 'me']\n")
    cfg = load_config(toml, env={"LIKERANK_LABELING__GROUP_SIZE": "20"}, overrides=["labeling.min_age_days=7.5"])
    assert cfg.labeling.group_size == 20 and cfg.origins["labeling.group_size"] == "env LIKERANK_LABELING__GROUP_SIZE"
    assert cfg.labeling.tag_bonus == 1.0 and cfg.origins["labeling.tag_bonus"] == f"file {toml}"
    assert cfg.labeling.min_age_days == 7.5 and cfg.origins["labeling.min_age_days"].startswith("flag")
    assert cfg.source.hashtags == ["selfie", "me"]
    assert cfg.origins["labeling.max_tags"] == "default"
    env_list = load_config(None, env={"LIKERANK_SOURCE__HASHTAGS": "a, b"})
    assert env_list.source.hashtags == ["a", "b"]


@pytest.mark.parametrize(
    ("toml", "env", "flags", "message"),
    [
        ("", {"LIKERANK_LABELING__GROUP_SIZE": "7"}, [],
         "labeling.group_size (from env LIKERANK_LABELING__GROUP_SIZE): must be even"),
        ("[labeling]\ngroup_size = '100'\n", {}, [], "labeling.group_size (from file"),
        ("[labeling]\ngroup_sise = 100\n", {}, [], "labeling.group_sise (from file"),
        ("[nope]\nx = 1\n", {}, [], "unknown section 'nope'"),
        ("", {"LIKERANK_SCRAPE__THREADS": "many"}, [], "expected an integer, got 'many'"),
        ("", {}, ["labeling.max_followers=1"], "labeling.max_followers (from flag"),
        ("", {}, ["validation.data_docs=maybe"], "expected a boolean"),
        ("", {}, ["labeling"], "expected section.field=value"),
        ("[faces]\nmax_faces = 1\nmin_faces = 2\n", {}, [], "faces.max_faces"),
    ],
)
def test_bad_values_are_rejected_with_key_source_and_reason(tmp_path, toml, env, flags, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, env=env, overrides=flags)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_not_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[labeling\n")
    with pytest.raises(ConfigError, match=r"broken.toml\): not valid TOML"):
        load_config(path, env={})


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "likerank.cli.main", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=60)


def test_cli_config_show_and_one_line_error():
    ok = _cli("config", "show")
    assert ok.returncode == 0, ok.stderr
    assert "group_size = 100    # file likerank.toml" in ok.stdout
    bad = _cli("config", "show", env={"LIKERANK_LABELING__GROUP_SIZE": "7"})
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "labeling.group_size" in bad.stderr and "LIKERANK_LABELING__GROUP_SIZE" in bad.stderr


def test_secrets_are_masked_in_show():
    out = _cli("--set", "storage.secret_access_key=hunter2", "config", "show").stdout
    assert "hunter2" not in out and "secret_access_key = ***" in out


@pytest.mark.parametrize("form", [["--toml"], ["--docs"]])
def test_secrets_are_masked_in_every_form_of_show(form):
    res = _cli("--set", "storage.secret_access_key=hunter2", "--set", "storage.access_key_id=AKIA-x",
               "config", "show", *form)
    assert res.returncode == 0 and "hunter2" not in res.stdout and "AKIA-x" not in res.stdout


def test_readme_table_reference_is_generated_from_the_schemas():
    from pipeline.core.tables import markdown_reference

    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- tables:begin -->")[1].split("<!-- tables:end -->")[0]
    assert section.strip() == markdown_reference().strip(), "run: likerank tables --markdown, paste into README"
