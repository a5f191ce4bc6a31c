import pytest

from marathon.config import load_config, parse_dotenv
from marathon.errors import ConfigError


def test_precedence_flags_env_dotenv_toml(tmp_path):
    (tmp_path / "marathon.toml").write_text('slots = 3\nmodel = "toml-model"\nnode_name = "from-toml"\n')
    (tmp_path / ".env").write_text("MARATHON_MODEL=dotenv-model\nMARATHON_MAX_TURNS=7\n")
    cfg = load_config({"slots": 9}, env={"MARATHON_MAX_TURNS": "8"}, cwd=tmp_path)
    assert cfg.slots == 9  # flag beats toml
    assert cfg.max_turns == 8  # env beats .env
    assert cfg.model == "dotenv-model"  # .env beats toml
    assert cfg.node_name == "from-toml"


def test_bad_values_name_key_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"'slots' from environment variable MARATHON_SLOTS"):
        load_config(env={"MARATHON_SLOTS": "many"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"'slots' .*at least 1"):
        load_config(env={"MARATHON_SLOTS": "0"}, cwd=tmp_path)
    (tmp_path / "marathon.toml").write_text("slotz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'slotz'"):
        load_config(env={}, cwd=tmp_path)
    (tmp_path / "marathon.toml").write_text("slots = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(env={}, cwd=tmp_path)
    (tmp_path / "marathon.toml").write_text('sandbox = "docker"\n')
    with pytest.raises(ConfigError, match="sandbox must be process, qemu or firecracker"):
        load_config(env={}, cwd=tmp_path)


def test_unrelated_env_is_ignored_and_secrets_redacted(tmp_path):
    cfg = load_config(env={"MARATHON_NOT_A_SETTING": "x", "MARATHON_ANTHROPIC_API_KEY": "sk-secret"}, cwd=tmp_path)
    assert cfg.redacted()["anthropic_api_key"] == "***"
    assert "sk-secret" not in repr(cfg.redacted())


def test_dotenv_parsing():
    assert parse_dotenv("# c\nexport A=1\nB='two words'\nC=\"x\"\nbroken\n") == {"A": "1", "B": "two words", "C": "x"}
