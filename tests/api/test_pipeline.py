"""Every transport runs the one pipeline: the same stages timed the same way."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

from service.api.pipeline import parse_server_timing

STAGES = {"decode", "queue", "compute", "render", "json", "total"}


def test_every_transport_reports_the_same_stages(client: TestClient, cat_png: bytes) -> None:
    files = {"file": ("cat.png", cat_png, "image/png")}
    b64 = {"instances": [{"image": {"b64": base64.b64encode(cat_png).decode()}}]}
    answers = {
        "/predict": client.post("/predict", files=files),
        "/explain": client.post("/explain", files=files, data={"outputs": "mask"}),
        ":predict": client.post("/v1/models/mobilenet_v2:predict", json=b64),
        ":explain": client.post("/v1/models/mobilenet_v2:explain",
                                json={**b64, "parameters": {"outputs": "mask"}}),
    }
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
        stages = parse_server_timing(response.headers["server-timing"])
        assert set(stages) == STAGES, (name, stages)
        timing = response.json()["timing_ms"]
        assert set(timing) == {"queue", "compute", "encode", "total"}, name
        assert timing["queue"] == stages["queue"] and timing["compute"] == stages["compute"], name
        assert timing["encode"] == stages["render"], name
        # The header's total also covers the serialisation that wrote timing_ms.
        assert stages["total"] >= timing["total"] >= stages["decode"], name
