"""CRIU lookup order and version parsing (phaul.engine.criu_locate)."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest

from phaul.engine import criu_locate
from phaul.engine.criu_locate import find_criu, parse_version, probe
from phaul.errors import CriuNotFound


def _fake_criu(path: Path, version_output: str, rc: int = 0) -> str:
    """A stand-in executable that answers --version (the lookup is under test, not CRIU)."""
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{version_output}'\nexit {rc}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Version: 4.2.1\n", (4, 2, 1)),
        ("Version: 4.2\nGitID: v4.2-22-g2cf8f13ca\n", (4, 2, 0)),
        ("Version: 3.17.1\n", (3, 17, 1)),
        ("Warn: x\nVersion:   10.0.3", (10, 0, 3)),
        ("criu 4.2", None),
        ("", None),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == expected


def test_explicit_wins_over_everything(tmp_path: Path) -> None:
    a = _fake_criu(tmp_path / "a", "Version: 4.2.1")
    b = _fake_criu(tmp_path / "b", "Version: 4.3")
    cfg = tmp_path / "phaul.toml"
    cfg.write_text(f'criu = "{b}"\n')
    got = find_criu(a, config_path=cfg, env={"PHAUL_CRIU": b})
    assert (got.path, got.version, got.source) == (a, "4.2.1", "argument")


def test_config_before_env(tmp_path: Path) -> None:
    a = _fake_criu(tmp_path / "a", "Version: 4.2.1")
    b = _fake_criu(tmp_path / "b", "Version: 4.3")
    cfg = tmp_path / "phaul.toml"
    cfg.write_text(f'# phaul\ncriu = "{a}"\nother = 1\n')
    got = find_criu(None, config_path=cfg, env={"PHAUL_CRIU": b})
    assert got.path == a
    assert got.source == f"config {cfg}"


def test_env_before_defaults(tmp_path: Path) -> None:
    b = _fake_criu(tmp_path / "b", "Version: 4.3")
    got = find_criu(None, config_path=tmp_path / "none.toml", env={"PHAUL_CRIU": b})
    assert (got.path, got.version, got.source) == (b, "4.3.0", "$PHAUL_CRIU")


def test_env_pointing_at_missing_path_is_an_error(tmp_path: Path) -> None:
    fake = str(tmp_path / "no-such-criu")
    with pytest.raises(CriuNotFound) as exc:
        find_criu(None, config_path=tmp_path / "none.toml", env={"PHAUL_CRIU": fake})
    msg = str(exc.value)
    assert fake in msg
    assert "$PHAUL_CRIU" in msg
    assert "deploy/setup.sh" in msg


def test_config_pointing_at_old_criu_is_an_error(tmp_path: Path) -> None:
    old = _fake_criu(tmp_path / "old", "Version: 4.1.1")
    cfg = tmp_path / "phaul.toml"
    cfg.write_text(f'criu = "{old}"\n')
    with pytest.raises(CriuNotFound, match=r"4\.1\.1.*>= 4\.2"):
        find_criu(None, config_path=cfg, env={})


def test_bad_config_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "phaul.toml"
    cfg.write_text("criu = 5\n")
    with pytest.raises(CriuNotFound, match="must be a non-empty string"):
        find_criu(None, config_path=cfg, env={})
    cfg.write_text("criu = [\n")
    with pytest.raises(CriuNotFound, match="cannot read"):
        find_criu(None, config_path=cfg, env={})


def test_not_criu_and_not_executable(tmp_path: Path) -> None:
    junk = _fake_criu(tmp_path / "junk", "hello", rc=0)
    with pytest.raises(CriuNotFound, match="not a working CRIU"):
        probe(junk, "argument")
    failing = _fake_criu(tmp_path / "failing", "Version: 4.2.1", rc=1)
    with pytest.raises(CriuNotFound, match="not a working CRIU"):
        probe(failing, "argument")
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(CriuNotFound, match="not executable"):
        probe(str(plain), "argument")


def test_path_is_searched_after_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(criu_locate, "DEFAULT_PATH", str(tmp_path / "absent"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    old = tmp_path / "old"
    old.mkdir()
    _fake_criu(old / "criu", "Version: 3.17")
    with pytest.raises(CriuNotFound, match=r"3\.17\.0"):
        find_criu(None, config_path=tmp_path / "none.toml", env={"PATH": str(old)})
    found = _fake_criu(bindir / "criu", "Version: 4.2.1")
    got = find_criu(None, config_path=tmp_path / "none.toml", env={"PATH": f"{bindir}:{old}"})
    assert (got.path, got.source) == (found, "PATH")
    with pytest.raises(CriuNotFound, match=r"deploy/setup\.sh"):
        find_criu(None, config_path=tmp_path / "none.toml", env={"PATH": str(tmp_path)})


def test_default_prefix_before_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = _fake_criu(tmp_path / "default-criu", "Version: 4.2.1")
    monkeypatch.setattr(criu_locate, "DEFAULT_PATH", default)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_criu(bindir / "criu", "Version: 4.9")
    got = find_criu(None, config_path=tmp_path / "none.toml", env={"PATH": str(bindir)})
    assert (got.path, got.source) == (default, "default")


def test_cmd_check_reports_fake_env_path_as_not_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(criu_locate, "CONFIG_PATH", tmp_path / "none.toml")
    monkeypatch.setenv("PHAUL_CRIU", str(tmp_path / "fake-criu"))
    rc = criu_locate.cmd_check(argparse.Namespace(criu=None, json=True))
    assert rc == CriuNotFound.exit_code
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert "fake-criu" in out["error"]


def test_cmd_check_fails_when_check_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # answers --version like CRIU 4.2 but "criu check" exits 1 with an error
    fake = tmp_path / "criu"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "Version: 4.2.1"; exit 0; fi\n'
        'echo "Error (criu/util.c:1534): rlimit: Can\'t setup RLIMIT_NOFILE" >&2\n'
        'echo "Error (criu/cr-check.c:1): seccomp missing" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    rc = criu_locate.cmd_check(argparse.Namespace(criu=str(fake), json=False))
    out = capsys.readouterr().out
    assert rc != 0
    assert "FAILED" in out
    assert "seccomp missing" in out
    assert "RLIMIT_NOFILE" not in out
    assert "(from argument)" in out
