"""POST /features and GET /models/{name}/kernels through HTTP with the real mobilenet_v2."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.imaging.colormaps import lookup_table

STEEL_BLUE = (70, 130, 180)


def features(client: TestClient, image: bytes, **form: str) -> dict:
    response = client.post("/features", files={"file": ("cat.png", image, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    return response.json()


def kernels(client: TestClient, **params: str) -> dict:
    response = client.get("/models/mobilenet_v2/kernels", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def png(data: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def tiles(body: dict) -> list[np.ndarray]:
    """Cut the grid back into its tiles, checking the separators on the way."""
    grid, info = png(body["grid_png"]), body["grid"]
    side, sep, columns = info["tile_size"], info["separator"], info["columns"]
    assert grid.shape[1] == columns * side + (columns + 1) * sep
    assert grid.shape[0] == info["rows"] * side + (info["rows"] + 1) * sep
    out = []
    for n in range(info["shown"]):
        r, c = divmod(n, columns)
        top, left = sep + r * (side + sep), sep + c * (side + sep)
        out.append(grid[top:top + side, left:left + side])
    return out


def test_features_of_the_default_layer(client: TestClient, cat_png: bytes) -> None:
    body = features(client, cat_png, max_channels="16")
    assert body["layer"] == "features.18"
    assert body["shape"] == [1280, 7, 7]
    assert body["image"]["width"] == 451 and body["model"]["name"] == "mobilenet_v2"
    channels = body["channels"]
    assert sorted(c["channel"] for c in channels) == list(range(1280))
    means = [c["mean"] for c in channels]
    assert means == sorted(means, reverse=True) and means[0] > 0
    for c in channels:
        assert 0.0 <= c["fraction_active"] <= 1.0
        assert c["max"] >= c["mean"]
    assert body["grid"] == {"columns": 4, "rows": 4, "tile_size": 49, "separator": 2, "shown": 16}
    grid = png(body["grid_png"])
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # white separators
    viridis = lookup_table("viridis")
    for tile in tiles(body):
        # Each tile is a 7x7 map enlarged 7 times, normalised on its own: it spans the whole map.
        cells = tile[::7, ::7]
        assert (tile == cells.repeat(7, axis=0).repeat(7, axis=1)).all()
        colours = {tuple(p) for p in cells.reshape(-1, 3)}
        assert tuple(viridis[0]) in colours and tuple(viridis[255]) in colours


def test_features_of_an_early_layer_show_at_most_max_channels(client: TestClient, cat_png: bytes) -> None:
    body = features(client, cat_png, layer="features.4", max_channels="100")
    assert body["shape"] == [32, 28, 28]
    assert body["grid"]["shown"] == 32 and len(body["channels"]) == 32
    assert len(tiles(body)) == 32


def test_features_refuse_unknown_layers_and_bad_options(client: TestClient, cat_png: bytes) -> None:
    files = {"file": ("cat.png", cat_png, "image/png")}
    unknown = client.post("/features", files=files, data={"layer": "features.99"})
    assert unknown.status_code == 422
    assert "features.18" in unknown.json()["error"]["message"]
    assert client.post("/features", files=files, data={"max_channels": "0"}).status_code == 422
    assert client.post("/features", files=files, data={"model": "nope"}).status_code == 404
    assert client.post("/features", data={"layer": "features.18"}).status_code == 400
    not_image = {"file": ("x.png", b"not an image", "image/png")}
    assert client.post("/features", files=not_image).status_code == 415


def test_first_layer_kernels_are_in_colour_and_match_the_weights(client: TestClient, app: FastAPI) -> None:
    body = kernels(client, layer="features.0.0")
    assert body["weight_shape"] == [32, 3, 3, 3]
    assert body["rendering"] == "rgb" and body["groups"] == 1
    assert body["grid"]["shown"] == 32
    weights = client.portal.call(
        app.state.engine.run, "mobilenet_v2",
        lambda loaded: loaded.modules["features.0.0"].weight.detach().cpu().numpy(),
    )
    side = body["grid"]["tile_size"]
    step = side // 3
    for n, tile in enumerate(tiles(body)):
        kernel = weights[n].transpose(1, 2, 0)  # (3, 3, RGB)
        expected = np.rint((kernel - kernel.min()) / (kernel.max() - kernel.min()) * 255)
        np.testing.assert_allclose(tile[step // 2::step, step // 2::step], expected, atol=1)
    grid = png(body["grid_png"])
    assert (grid[..., 0] != grid[..., 1]).any()  # colour, not grey


@pytest.mark.parametrize("mode, rendering", [("mean", "input_mean"), ("first", "first_input")])
def test_later_kernels_are_grey(client: TestClient, mode: str, rendering: str) -> None:
    body = kernels(client, layer="features.2.conv.0.0", mode=mode, max_kernels="10")
    assert body["weight_shape"] == [96, 16, 1, 1]
    assert body["rendering"] == rendering and body["grid"]["shown"] == 10
    grid = png(body["grid_png"])
    assert tuple(grid[0, 0]) == STEEL_BLUE
    for tile in tiles(body):
        assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()


def test_mean_and_first_input_channel_differ(client: TestClient) -> None:
    mean = kernels(client, layer="features.2.conv.1.0", mode="mean")
    first = kernels(client, layer="features.2.conv.1.0", mode="first")
    # A depthwise convolution has one input channel per kernel: both modes show the same thing.
    assert mean["rendering"] == first["rendering"] == "single_input"
    assert mean["groups"] == 96 and mean["grid_png"] == first["grid_png"]
    full = [kernels(client, layer="features.18.0", mode=m, max_kernels="16") for m in ("mean", "first")]
    assert full[0]["grid_png"] != full[1]["grid_png"]


def test_kernels_of_a_non_convolution_name_the_convolutions(client: TestClient) -> None:
    response = client.get("/models/mobilenet_v2/kernels", params={"layer": "features.18"})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "not a convolution layer" in message
    assert "features.0.0" in message and "features.18.0" in message
    unknown = client.get("/models/mobilenet_v2/kernels", params={"layer": "nope"})
    assert unknown.status_code == 422 and "unknown" in unknown.json()["error"]["message"]
    assert client.get("/models/nope/kernels", params={"layer": "features.0.0"}).status_code == 404
    assert client.get("/models/mobilenet_v2/kernels").status_code == 400


def test_explain_with_evaluate_scores_each_map(client: TestClient, cat_png: bytes) -> None:
    files = {"file": ("cat.png", cat_png, "image/png")}
    form = {"methods": "gradcam,random", "outputs": "mask", "mask_size": "feature",
            "evaluate": "true", "eval_steps": "4"}
    response = client.post("/explain", files=files, data=form)
    assert response.status_code == 200, response.text
    gradcam, random = response.json()["results"][0]["explanations"]
    assert set(gradcam["faithfulness"]) == {
        "deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "steps"
    }
    assert gradcam["faithfulness"]["steps"] == 4
    good, floor = gradcam["faithfulness"], random["faithfulness"]
    assert good["insertion_auc"] > good["deletion_auc"]
    assert good["insertion_auc"] - good["deletion_auc"] > floor["insertion_auc"] - floor["deletion_auc"]
    assert 0.0 <= good["average_drop"] <= 1.0 and isinstance(good["increase_in_confidence"], bool)
    plain = client.post("/explain", files=files, data={"outputs": "mask", "mask_size": "feature"})
    assert "faithfulness" not in plain.json()["results"][0]["explanations"][0]
    bad = client.post("/explain", files=files, data={"evaluate": "true", "eval_steps": "0"})
    assert bad.status_code == 422
