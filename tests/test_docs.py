"""The documentation covers every setting and close code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import server
from rooms.errors import CloseCode

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_with_help() -> None:
    """Each Settings field has a help string, and the README's table is current
    (regenerate it with ``python server.py settings-table``)."""
    readme = (ROOT / "README.md").read_text()
    for f in dataclasses.fields(server.Settings):
        assert f.metadata.get("help"), f.name
    assert server.settings_table() in readme


def test_every_close_code_is_documented() -> None:
    """Each close code the server sends appears in the README and the protocol doc."""
    readme = (ROOT / "README.md").read_text()
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    for code in CloseCode:
        if code == CloseCode.NORMAL:
            continue
        assert re.search(rf"\|\s*{int(code)}\s*\|", readme), code
        assert re.search(rf"\|\s*{int(code)}\s*\|", protocol), code


def test_readme_quick_start_has_the_two_commands() -> None:
    """The Quick start names exactly the run and the test command, and CI calls the latter."""
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_settings_come_from_the_environment() -> None:
    """COILROOM_ variables are read and converted; unknown ones are refused."""
    s = server.Settings.from_environ(
        {
            "COILROOM_PORT": "9000",
            "COILROOM_COOKIE_SECURE": "true",
            "COILROOM_OPEN_TIMEOUT": "2.5",
        }
    )
    assert (s.port, s.cookie_secure, s.open_timeout) == (9000, True, 2.5)
    import pytest

    with pytest.raises(SystemExit):
        server.Settings.from_environ({"COILROOM_PROT": "1"})
    with pytest.raises(SystemExit):
        server.Settings.from_environ({"COILROOM_PORT": "eighty"})


def test_secret_key_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    """An unset key is generated into the data folder (mode 600) and reused; repr hides it."""
    s1 = server.Settings(data_dir=str(tmp_path)).resolved()
    s2 = server.Settings(data_dir=str(tmp_path)).resolved()
    assert s1.secret_key == s2.secret_key and len(s1.secret_key) >= 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    assert s1.secret_key not in repr(s1)


def test_every_api_route_is_documented() -> None:
    """Each HTTP API route has its heading in docs/api.md (``METHOD /path``)."""
    api = (ROOT / "docs" / "api.md").read_text()
    app = server.create_app(server.Settings(data_dir="/nonexistent")).app
    missing = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/api/"):
            continue
        # ``/api/dashboard/{table}.csv`` is documented once, with its JSON table.
        shown = re.sub(r"\{(\w+):\w+\}", r"{\1}", path).removesuffix(".csv")
        for method in sorted((route.methods or set()) - {"HEAD"}):
            if f"`{method} {shown}" not in api:
                missing.append(f"{method} {shown}")
    assert not missing, missing
