"""``python -m service.ray_serve`` on this machine: a local Ray cluster serving the HTTP contract
through Ray's HTTP proxy, with the repo's Serve config, stopped cleanly on SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ray_serve import APP_NAME, INGRESS_NAME, build_app, model_deployment_name, read_serve_config

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"  # a GPU cluster's
CPU_CONFIG = ROOT / "deploy" / "serve_config.cpu.yaml"  # this machine's, for the live test
CONFIGS = pytest.mark.parametrize("config", [SERVE_CONFIG, CPU_CONFIG], ids=["gpu", "cpu"])
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment carries ``marker``: the CLI and every Ray process it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def _wait_until(condition, timeout_s: float, interval_s: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


class RayServe:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path, marker: str) -> None:
        self.proc, self.url, self.log, self.marker = proc, url, log, marker

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    port = _free_port()
    marker = f"camserve-ray-test-{uuid.uuid4().hex}"
    log = tmp_path_factory.mktemp("ray_serve") / "output.log"
    env = {**os.environ, "CAMSERVE_RAY_TEST_MARKER": marker, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # always a local cluster of its own
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.ray_serve", "--port", str(port), "--num-cpus", "2",
             "--config", str(CPU_CONFIG)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = RayServe(proc, f"http://127.0.0.1:{port}", log, marker)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _wait_until(lambda: not _processes_with(marker), 30)
        for pid in _processes_with(marker):  # only what this test started
            os.kill(pid, signal.SIGKILL)


def _wait_ready(server: RayServe) -> httpx.Response:
    last: httpx.Response | None = None

    def ready() -> bool:
        nonlocal last
        assert server.proc.poll() is None, f"ray_serve exited early:\n{server.output()[-4000:]}"
        try:
            last = httpx.get(f"{server.url}/readyz", timeout=5)
        except httpx.HTTPError:
            return False
        return last.status_code == 200

    assert _wait_until(ready, START_TIMEOUT_S), (
        f"not ready within {START_TIMEOUT_S}s (last: {last and last.status_code}):\n{server.output()[-4000:]}"
    )
    assert last is not None
    return last


@pytest.mark.slow
@pytest.mark.timeout(600)  # a local Ray cluster on a busy 2-core machine: start, serve, drain, stop
def test_serves_the_contract_through_ray_and_stops_cleanly(ray_serve: RayServe, cat_png: bytes) -> None:
    ready = _wait_ready(ray_serve)
    assert ready.json()["state"] == "ready"

    response = httpx.post(
        f"{ray_serve.url}/explain",
        files={"file": ("chelsea.png", cat_png, "image/png")},
        data={"methods": "gradcam", "topk": "3"},
        headers={"X-Request-ID": "ray-serve-test"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == "ray-serve-test"
    body = response.json()
    assert body["model"]["name"] == "mobilenet_v2"
    (result,) = body["results"]
    assert result["predictions"][0]["label"] == "Egyptian cat"
    assert len(result["predictions"]) == 3
    (explanation,) = result["explanations"]
    assert explanation["method"] == "gradcam" and explanation["class_idx"] == 285
    assert explanation["mask"]["shape"] == [224, 224]
    assert base64.b64decode(explanation["overlay_png"]).startswith(b"\x89PNG\r\n\x1a\n")

    # The contract's errors come through the proxy unchanged.
    unknown = httpx.post(f"{ray_serve.url}/explain", files={"file": ("c.png", cat_png, "image/png")},
                         data={"methods": "no-such-cam"}, timeout=60)
    assert unknown.status_code == 422
    assert "gradcam" in unknown.json()["error"]["message"]

    # The batch was computed by the model's own deployment, not in the ingress.
    assert _wait_until(lambda: f"ServeReplica:{APP_NAME}:{model_deployment_name('mobilenet_v2')}"
                       in ray_serve.output(), 10)

    ray_serve.proc.send_signal(signal.SIGTERM)
    assert ray_serve.proc.wait(timeout=STOP_TIMEOUT_S) == 0, ray_serve.output()[-4000:]
    assert _wait_until(lambda: not _processes_with(ray_serve.marker), 30), (
        f"Ray processes left behind: {_processes_with(ray_serve.marker)}"
    )


@CONFIGS
def test_serve_config_names_the_deployments_the_app_builds(config: Path) -> None:
    args = read_serve_config(config)
    app = build_app(args)
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_NAME
    models = ingress.init_args[1]
    assert set(models) == {"mobilenet_v2"}
    model = models["mobilenet_v2"]._bound_deployment
    assert model.name == model_deployment_name("mobilenet_v2")
    # the file's autoscaling and resources are what the deployments get
    configured = {d["name"]: d for d in args["deployments"]}
    for deployment in (ingress, model):
        autoscaling = deployment._deployment_config.autoscaling_config
        wanted = configured[deployment.name]["autoscaling_config"]
        assert autoscaling.min_replicas == wanted["min_replicas"]
        assert autoscaling.max_replicas == wanted["max_replicas"]
        assert autoscaling.target_ongoing_requests == wanted["target_ongoing_requests"]
        wanted_cpus = configured[deployment.name]["ray_actor_options"]["num_cpus"]
        assert deployment.ray_actor_options["num_cpus"] == wanted_cpus
    assert model.init_args[0]["max_batch_size"] == args["settings"]["max_batch_size"]


@CONFIGS
def test_serve_config_is_a_valid_serve_deploy_config(config: Path) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text()))
    (application,) = schema.applications
    assert application.import_path == "service.ray_serve:build_app"
    assert application.route_prefix == "/"
    assert {d.name for d in application.deployments} == {INGRESS_NAME, model_deployment_name("mobilenet_v2")}


def _resources_after_serve_applies(config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each deployment's Ray resources once Serve has built the app from the config's args and
    applied the config's deployment options, with Serve's own code (as ``serve deploy`` does)."""
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.schema import ServeDeploySchema

    (application,) = ServeDeploySchema.model_validate(config).applications
    # Handles stand in as names: Serve's own would look for a running controller.
    built = serve_build_app(build_app(application.args), name=APP_NAME,
                            make_deployment_handle=lambda deployment, _app: deployment.name)
    infos = {d.name: DeploymentInfo(d._deployment_config, d._replica_config, 0, "")
             for d in built.deployments}
    applied = override_deployment_info(infos, application)
    return {name: dict(info.replica_config.resource_dict) for name, info in applied.items()}


def test_the_gpu_config_keeps_its_gpu_request_when_serve_applies_it() -> None:
    import yaml

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    resources = _resources_after_serve_applies(config)
    assert resources[model_deployment_name("mobilenet_v2")].get("GPU") == 1
    assert not resources[INGRESS_NAME].get("GPU"), "the ingress holds no model"
    # What the old config did: resources named without num_gpus replace the code's GPU request.
    for deployment in config["applications"][0]["deployments"]:
        deployment.get("ray_actor_options", {}).pop("num_gpus", None)
    dropped = _resources_after_serve_applies(config)
    assert not dropped[model_deployment_name("mobilenet_v2")].get("GPU")


def test_the_cpu_config_asks_for_no_gpu() -> None:
    import yaml

    resources = _resources_after_serve_applies(yaml.safe_load(CPU_CONFIG.read_text()))
    assert not any(r.get("GPU") for r in resources.values())


@pytest.mark.parametrize(("gpus", "settings", "size"), [
    (1, {"device": "auto"}, 64), (0, {"device": "cpu"}, 8), (1, {"device": "auto", "max_batch_size": 12}, 12),
])
def test_the_ingress_batches_at_the_replicas_device_size(
    gpus: int, settings: dict[str, Any], size: int
) -> None:
    # The ingress's own slots are CPU ones: an unset batch size is resolved for the replicas'
    # kind where the app is built, and handed to the ingress and the replicas alike.
    app = build_app({"settings": settings, "gpus_per_replica": gpus})
    ingress = app._bound_deployment
    model = ingress.init_args[1]["mobilenet_v2"]._bound_deployment
    assert ingress.init_args[0]["max_batch_size"] == size
    assert model.init_args[0]["max_batch_size"] == size
