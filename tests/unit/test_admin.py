"""Admin token checks and settings (the routes themselves: tests/integration/test_admin.py)."""

import pytest

from stream.admin import AdminError, check_token
from stream.settings import SettingsError, WorkerSettings, read_admin_token

TOKEN = "s3cret-token-0123456789"


def test_check_token_accepts_only_the_configured_bearer_token():
    check_token(TOKEN, f"Bearer {TOKEN}")
    check_token(TOKEN, f"bearer {TOKEN}")
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", f"Bearer {TOKEN[:-1]}"):
        with pytest.raises(AdminError) as caught:
            check_token(TOKEN, header)
        assert caught.value.status == 401
    with pytest.raises(AdminError) as caught:
        check_token(None, f"Bearer {TOKEN}")
    assert caught.value.status == 403 and "disabled" in str(caught.value)


def test_admin_token_settings(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_admin_token(path, "ignored-when-a-file-is-given") == TOKEN
    assert read_admin_token(None, TOKEN) == TOKEN
    assert read_admin_token(None, None) is None
    with pytest.raises(SettingsError, match="cannot read the admin token file"):
        read_admin_token(tmp_path / "missing", None)
    WorkerSettings("127.0.0.1:9092", tmp_path, admin_token=TOKEN).validate()
    for bad in ("short", "x" * 15, "tab\tinside-a-token-0123"):
        with pytest.raises(SettingsError, match="at least 16 printable"):
            WorkerSettings("127.0.0.1:9092", tmp_path, admin_token=bad).validate()
    assert TOKEN not in repr(WorkerSettings("127.0.0.1:9092", tmp_path, admin_token=TOKEN))
