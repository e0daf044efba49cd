from __future__ import annotations

from .support import RunningRelayd


async def test_register_and_list(relayd: RunningRelayd) -> None:
    alice = await relayd.http.register("alice")
    response = await relayd.http.get("/clients", token=alice["access_token"])
    assert response.status == 200
    assert response.json()["clients"] == {alice["uuid"]: "alice"}
