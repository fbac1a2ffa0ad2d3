"""The destination endpoint over real HTTP: Redox's handshake, the token check, limits, the inbox."""

import json
import sqlite3
import stat
from pathlib import Path

import httpx
import pytest

from pipelines.webhook import TokenError, Tokens
from resources.inbox import Inbox
from tests.push.harness import OLD_TOKEN, TOKEN, receiver_in_thread

pytestmark = pytest.mark.integration

EVENT = {
    "Meta": {"DataModel": "Results", "EventType": "New", "Logs": [{"ID": "log-1", "AttemptID": "try-1"}]}
}


@pytest.fixture
def inbox_path(tmp_path: Path) -> Path:
    return tmp_path / "inbox" / "inbox.sqlite"


def _rejections(path: Path) -> list[tuple[int, str, int]]:
    with sqlite3.connect(path) as con:
        return [tuple(r) for r in con.execute("SELECT status, reason, size FROM rejections ORDER BY id")]  # type: ignore[misc]


def test_verification_post_and_get_answer_only_the_challenge(inbox_path: Path) -> None:
    with receiver_in_thread(inbox_path) as url:
        post = httpx.post(
            f"{url}/redox",
            json={"verification-token": TOKEN, "challenge": "2e73f864-a0e9-4764-a7d5-91fe5836db22"},
            headers={"application-name": "RedoxEngine"},
        )
        get = httpx.get(f"{url}/redox", params={"challenge": "cc2f1bdf-1", "verification-token": TOKEN})
        bad = httpx.get(f"{url}/redox", params={"challenge": "cc2f1bdf-1", "verification-token": "nope"})
    assert (post.status_code, post.text) == (200, "2e73f864-a0e9-4764-a7d5-91fe5836db22")
    assert (get.status_code, get.text) == (200, "cc2f1bdf-1")
    assert bad.status_code == 403
    assert Inbox(inbox_path).head_seq() == 0  # a handshake is not a delivery


def test_token_missing_wrong_and_rotated(inbox_path: Path) -> None:
    with receiver_in_thread(inbox_path, tokens=[TOKEN, OLD_TOKEN]) as url:
        missing = httpx.post(url, json=EVENT)
        wrong = httpx.post(url, json=EVENT, headers={"verification-token": TOKEN + "x"})
        old = httpx.post(url, json=EVENT, headers={"verification-token": OLD_TOKEN})
        new = httpx.post(url, json=EVENT, headers={"verification-token": TOKEN})
    assert (missing.status_code, wrong.status_code, old.status_code, new.status_code) == (401, 403, 200, 200)
    reasons = [r[:2] for r in _rejections(inbox_path)]
    assert reasons == [(401, "missing verification-token"), (403, "wrong verification-token")]


def test_token_file_is_reread_and_must_be_private(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("first-token\n")
    file.chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        Tokens([], file)
    file.chmod(0o600)
    tokens = Tokens([], file)
    assert tokens.accepts("first-token") and not tokens.accepts("second-token")
    file.write_text("first-token\nsecond-token\n")  # rotation: both valid until Redox switches
    assert tokens.accepts("second-token") and tokens.accepts("first-token")
    file.write_text("second-token\n")
    assert not tokens.accepts("first-token")
    with pytest.raises(TokenError, match="REDOX_WEBHOOK_TOKENS"):
        Tokens([""], None)


def test_size_and_content_limits_are_refused_and_recorded_without_body(inbox_path: Path) -> None:
    secret_text = "Bixby-1234"
    with receiver_in_thread(inbox_path, max_body=2000) as url:
        headers = {"verification-token": TOKEN}
        too_big = httpx.post(url, content=json.dumps({"x": secret_text * 400}).encode(), headers=headers)
        not_json = httpx.post(url, content=f"<xml>{secret_text}</xml>".encode(), headers=headers)
        ok = httpx.post(url, json=EVENT, headers=headers)
    assert (too_big.status_code, not_json.status_code, ok.status_code) == (413, 400, 200)
    assert [r[:2] for r in _rejections(inbox_path)] == [
        (413, "body over 2000 bytes"),
        (400, "body is not JSON"),
    ]
    raw = b"".join(p.read_bytes() for p in inbox_path.parent.iterdir() if p.is_file())
    assert secret_text.encode() not in raw
    assert stat.S_IMODE(inbox_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(inbox_path.parent.stat().st_mode) == 0o700


def test_a_delivery_is_stored_before_200_without_the_token_and_a_redelivery_is_marked(
    inbox_path: Path,
) -> None:
    again = {"Meta": {**EVENT["Meta"], "Logs": [{"ID": "log-1", "AttemptID": "try-2"}]}}
    fhir = {
        "resourceType": "Bundle",
        "id": "b-1",
        "type": "message",
        "entry": [
            {"resource": {"resourceType": "MessageHeader", "id": "mh-1", "eventUri": "x/ResultCreated"}}
        ],
    }
    with receiver_in_thread(inbox_path) as url:
        headers = {"verification-token": TOKEN}
        answers = [httpx.post(url, json=body, headers=headers).json() for body in (EVENT, again, fhir, fhir)]
        # The 200 came after the commit: another connection sees the row at once.
        stored = Inbox(inbox_path).deliveries()
    assert [a["redelivery"] for a in answers] == [False, True, False, True]
    assert [(d.key, d.duplicate_of) for d in stored] == [
        ("log:log-1", None),
        ("log:log-1", 1),
        ("fhir-message:mh-1", None),
        ("fhir-message:mh-1", 3),
    ]
    with sqlite3.connect(inbox_path) as con:
        headers_stored = [json.loads(h) for (h,) in con.execute("SELECT headers FROM deliveries")]
    assert all("verification-token" not in h for h in headers_stored)
    assert all(h.get("content-type") == "application/json" for h in headers_stored)


def test_store_failure_answers_503_so_redox_retries(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the inbox folder should be")
    with receiver_in_thread(blocked / "inbox.sqlite") as url:
        answer = httpx.post(url, json=EVENT, headers={"verification-token": TOKEN})
    assert answer.status_code == 503
    assert "retry" in answer.text
