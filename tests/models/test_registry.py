"""Models files (TOML and JSON), weights checked by sha256, and a custom model served end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.models.loader import ModelLoadError, load_model, verify_weights
from service.models.spec import EMBEDDED_SHA256, ModelsFileError, embedded_default, read_models_file
from tests.conftest import ready_client
from tests.custom_model import LABELS, png, write_models_file


@pytest.fixture(scope="module")
def custom_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    write_models_file(folder)
    return folder


def test_embedded_weights_match_their_hash() -> None:
    spec = embedded_default()
    assert spec.weights is not None and spec.weights.is_file()
    assert hashlib.sha256(spec.weights.read_bytes()).hexdigest() == EMBEDDED_SHA256
    verify_weights(spec)


def test_a_wrong_hash_refuses_to_load(custom_model_dir: Path) -> None:
    spec = read_models_file(custom_model_dir / "models.toml")[0]
    tampered = spec.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="refusing to load"):
        verify_weights(tampered)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(tampered, torch.device("cpu"))


def test_a_wrong_hash_stops_start_up(custom_model_dir: Path, tmp_path: Path) -> None:
    text = (custom_model_dir / "models.toml").read_text()
    digest = read_models_file(custom_model_dir / "models.toml")[0].sha256
    assert digest is not None
    for name in ("tiny.pt", "labels.txt"):  # paths may not lead out of the models file's folder
        (tmp_path / name).write_bytes((custom_model_dir / name).read_bytes())
    bad = tmp_path / "models.toml"
    bad.write_text(text.replace(digest, "f" * 64))
    app = create_app(Settings(models_file=bad))
    with pytest.raises(ModelLoadError, match="refusing to load"), TestClient(app):
        pass


def test_models_file_rejects_urls_and_missing_hashes(tmp_path: Path) -> None:
    url = tmp_path / "url.json"
    url.write_text(json.dumps({"models": [{"name": "m", "architecture": "resnet18",
                                           "weights": "https://example.org/w.pt", "sha256": "a" * 64}]}))
    with pytest.raises(ModelsFileError, match="never URLs"):
        read_models_file(url)
    unhashed = tmp_path / "unhashed.json"
    entry = {"name": "m", "architecture": "resnet18", "weights": "w.pt"}
    unhashed.write_text(json.dumps({"models": [entry]}))
    with pytest.raises(ModelsFileError, match="sha256"):
        read_models_file(unhashed)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    spec = embedded_default().model_copy(update={"architecture": "resnet9000", "weights": None,
                                                 "sha256": None})
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        load_model(spec, torch.device("cpu"))


def test_json_models_file_with_inline_labels(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": "inline", "architecture": "resnet18", "num_classes": 3,
                                            "labels": LABELS}]}))
    spec = read_models_file(path)[0]
    loaded = load_model(spec, torch.device("cpu"))
    assert loaded.labels == LABELS
    assert loaded.default_layer == "layer4.1"


def test_custom_model_is_served(custom_model_dir: Path) -> None:
    app = create_app(Settings(models_file=custom_model_dir / "models.toml"))
    for client in ready_client(app):
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert set(models) == {"mobilenet_v2", "tiny_resnet"}
        tiny = models["tiny_resnet"]
        assert (tiny["display_name"], tiny["version"], tiny["num_classes"]) == ("Tiny ResNet", "2024-05", 3)
        assert tiny["input_size"] == [128, 96]
        assert tiny["default_layer"] == "layer4.1" and tiny["default"] is False

        detail = client.get("/models/tiny_resnet").json()
        layer4 = next(layer for layer in detail["layers"] if layer["name"] == "layer4")
        assert layer4["shape"] == [512, 4, 3]

        response = client.post(
            "/explain",
            files={"file": ("scan.png", png(200, 150), "image/png")},
            data={"model": "tiny_resnet", "class_idx": "0,2", "mask_size": "feature", "topk": "3",
                  "target_layer": "layer3,layer4"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "tiny_resnet", "version": "2024-05", "input_size": [128, 96]}
        result = body["results"][0]
        assert sorted(p["label"] for p in result["predictions"]) == sorted(LABELS)
        assert abs(sum(p["score"] for p in result["predictions"]) - 1.0) < 1e-4
        explanations = result["explanations"]
        assert [(e["class_idx"], e["label"]) for e in explanations] == [(0, "normal"), (2, "malignant")]
        # Fused layers give the larger grid (layer3: 8x6).
        assert all(e["mask"]["shape"] == [8, 6] for e in explanations)
        assert all(e["target_layer"] == "layer3,layer4" for e in explanations)

        out_of_range = client.post("/explain", files={"file": ("s.png", png(64, 64), "image/png")},
                                   data={"model": "tiny_resnet", "class_idx": "3"})
        assert out_of_range.status_code == 422
        assert "0..2" in out_of_range.json()["error"]["message"]
