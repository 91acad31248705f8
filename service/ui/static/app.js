// camserve review page: plain JavaScript, no build step, no third-party code.
//
// One request to POST /explain per run, asking for outputs=heatmap. The opacity slider re-blends
// in the browser: the uploaded image, then the RGBA heatmap PNG (alpha = map value) on top with
// globalAlpha = opacity. Formats the browser cannot show as the service reads them (TIFF, DICOM,
// 16-bit PNG...) fall back to the overlay PNG the service blended (outputs=overlay,heatmap then),
// with the slider disabled.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const el = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    for (const child of children) node.append(child);
    return node;
  };

  const KEY_STORE = "camserve.apiKey";
  const TOPK = 5;
  const MAX_ZOOM = 32;

  const ui = {
    form: $("#controls"), file: $("#file"), dropzone: $("#dropzone"), fileList: $("#file-list"),
    model: $("#model"), methods: $("#methods"), layer: $("#layer"), classIdx: $("#class-idx"),
    classClear: $("#class-clear"), colormap: $("#colormap"), apiKey: $("#api-key"), run: $("#run"),
    banner: $("#banner"), bannerTitle: $("#banner-title"), bannerMessage: $("#banner-message"),
    bannerId: $("#banner-id"), bannerClose: $("#banner-close"), status: $("#status"),
    result: $("#result"), imageTitle: $("#image-title"), prev: $("#prev"), next: $("#next"),
    timings: $("#timings"), predictions: $("#predictions"), opacity: $("#opacity"),
    opacityValue: $("#opacity-value"), panels: $("#panels"),
    zoomIn: $("#zoom-in"), zoomOut: $("#zoom-out"), zoomFit: $("#zoom-fit"), zoomValue: $("#zoom-value"),
  };

  const state = {
    models: [], methods: [], catalogReady: false,
    selection: null,      // the files last picked or dropped: {files, sources}
    response: null,       // the last ExplainResponse
    responseAlpha: 0.5,   // the opacity it was asked with (the service's overlays use it)
    shown: null,          // the selection that response answers (a newer one may have failed)
    roundTripMs: 0,
    current: 0,           // index into response.results
    entry: null,          // the prepared current result: its source image and panels
    opacity: 0.5,
    view: { zoom: 1, cx: 0.5, cy: 0.5 },  // shared by every panel; centre in image fractions
    run: 0,               // id of the latest run: older answers are dropped
    abort: null,
  };
  let prepared = new Map();        // result index -> Promise of its prepared entry, per response

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, code, message, requestId, retryAfter) {
      super(message);
      Object.assign(this, { status, code, requestId, retryAfter });
    }
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = ui.apiKey.value.trim();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network", "The service did not answer. Is it running, and is the address right?", "", null);
    }
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch { body = null; }
    if (!response.ok) {
      const detail = (body && body.error) || {};
      throw new ApiError(
        response.status, detail.code || `http_${response.status}`,
        detail.message || `${response.status} ${response.statusText}`.trim(),
        detail.request_id || response.headers.get("X-Request-ID") || "",
        response.headers.get("Retry-After"),
      );
    }
    return body;
  }

  // ---------------------------------------------------------------- messages

  const TITLES = {
    0: "Can't reach the service",
    400: "The request was not understood",
    401: "API key needed",
    404: "Not found",
    413: "Too large",
    415: "Not an image the service can read",
    422: "Option not accepted",
    503: "Service busy or not ready",
    504: "Timed out",
    500: "The service failed on this request",
  };

  function showError(err, context = "") {
    const status = err instanceof ApiError ? err.status : -1;
    let message = err.message || String(err);
    if (!/[.!?]$/.test(message)) message += ".";
    if (status === 401) {
      message += ui.apiKey.value.trim()
        ? " The key in the API key field was not accepted: correct it and press Enter."
        : " Type the service's key in the API key field and press Enter.";
    } else if (status === 415 && !/supported/i.test(message)) {
      message += " Supported: JPEG, PNG, TIFF, BMP, WebP, GIF and DICOM.";
    } else if (status === 413) {
      message += " Send fewer or smaller files.";
    } else if (status === 503) {
      message += err.retryAfter ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
    } else if (status === 504) {
      message += " The service is busy; try again, or send fewer images at once.";
    }
    ui.bannerTitle.textContent = (TITLES[status] || "Something went wrong") + (context ? ` (${context})` : "");
    ui.bannerMessage.textContent = message;
    ui.bannerId.textContent = err.requestId ? `request id ${err.requestId}` : "";
    ui.banner.hidden = false;
    setStatus("");
    if (status === 401) ui.apiKey.focus();
  }

  function clearError() { ui.banner.hidden = true; }

  function setStatus(text, busy = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("busy", busy);
    document.body.dataset.busy = busy ? "true" : "false";
  }

  // ---------------------------------------------------------------- catalog

  async function loadCatalog() {
    state.catalogReady = false;
    for (let attempt = 0; ; attempt++) {
      try {
        const [models, methods] = await Promise.all([api("models"), api("methods")]);
        state.models = models.models;
        state.methods = methods.methods;
        break;
      } catch (err) {
        // Not ready yet (models still loading): wait and ask again, saying so.
        if (err instanceof ApiError && err.status === 503 && attempt < 60) {
          setStatus("The service is still loading its models…", true);
          await new Promise((resolve) => setTimeout(resolve, 1000 * Math.min(5, 1 + attempt)));
          continue;
        }
        showError(err, "loading models and methods");
        ui.model.replaceChildren(el("option", { textContent: "not loaded" }));
        ui.methods.replaceChildren(el("span", { className: "hint", textContent: "not loaded" }));
        return false;
      }
    }
    fillModels();
    fillMethods();
    state.catalogReady = true;
    await loadLayers();
    if (!state.response) setStatus("Choose or drop images to start.");
    return true;
  }

  function fillModels() {
    const previous = ui.model.value;
    ui.model.replaceChildren(...state.models.map((m) =>
      el("option", { value: m.name, textContent: `${m.display_name}`, selected: m.default })));
    if (state.models.some((m) => m.name === previous)) ui.model.value = previous;
    ui.model.disabled = false;
  }

  function fillMethods() {
    const checked = new Set(checkedMethods());
    if (!checked.size) checked.add("gradcam");
    const families = [...new Set(state.methods.map((m) => m.family))];
    const nodes = [];
    for (const family of families) {
      nodes.push(el("p", { className: "family", textContent: family }));
      for (const m of state.methods.filter((x) => x.family === family)) {
        const box = el("input", { type: "checkbox", name: "methods", value: m.name, checked: checked.has(m.name) });
        nodes.push(el("label", { title: `${m.title}: ${m.passes}. ${m.paper}` }, box, m.title));
      }
    }
    ui.methods.replaceChildren(...nodes);
    if (!checkedMethods().length && state.methods.length) ui.methods.querySelector("input").checked = true;
  }

  function checkedMethods() {
    return [...ui.methods.querySelectorAll("input:checked")].map((box) => box.value);
  }

  async function loadLayers() {
    const name = ui.model.value;
    ui.layer.disabled = true;
    try {
      const detail = await api(`models/${encodeURIComponent(name)}`);
      const options = [el("option", { value: "", textContent: `model default (${detail.default_layer})` })];
      for (const layer of detail.layers) {
        options.push(el("option", {
          value: layer.name, textContent: `${layer.name} · ${layer.kind} · ${layer.shape.join("×")}`,
        }));
      }
      ui.layer.replaceChildren(...options);
      ui.layer.disabled = false;
    } catch (err) {
      ui.layer.replaceChildren(el("option", { value: "", textContent: "model default" }));
      showError(err, "loading the model's layers");
    }
  }

  // ---------------------------------------------------------------- running

  function setFiles(fileList) {
    const files = [...fileList];
    if (!files.length) return;
    // sources: "fileIndex:frame" -> Promise<{bitmap} | {reason}>, the browser's own decodes.
    state.selection = { files, sources: new Map() };
    state.current = 0;
    ui.fileList.textContent = files.length === 1
      ? `Selected: ${files[0].name}`
      : `Selected ${files.length} files: ${files.map((f) => f.name).join(", ")}`;
    explain();
  }

  async function explain() {
    clearError();
    const selection = state.selection;
    if (!selection) {
      setStatus("Choose or drop images first.");
      ui.file.focus();
      return;
    }
    if (!state.catalogReady && !(await loadCatalog())) return;
    const methods = checkedMethods();
    if (!methods.length) {
      showError(new Error("Tick at least one method."));
      return;
    }
    if (state.abort) state.abort.abort();
    const abort = new AbortController();
    state.abort = abort;
    const run = ++state.run;
    const { files } = selection;
    setStatus(`Explaining ${files.length === 1 ? files[0].name : `${files.length} files`}…`, true);

    const form = new FormData();
    for (const file of files) form.append("file", file, file.name);
    form.append("model", ui.model.value);
    form.append("methods", methods.join(","));
    if (ui.layer.value) form.append("target_layer", ui.layer.value);
    if (ui.classIdx.value.trim()) form.append("class_idx", ui.classIdx.value.trim());
    form.append("topk", String(TOPK));
    // The browser blends heatmaps over the files it can show; the service's overlays are only
    // needed for the others (TIFF, DICOM, 16-bit PNG).
    const shown = await Promise.all(files.map((_, i) => source(selection, i, 0)));
    if (run !== state.run) return;
    form.append("outputs", shown.every((s) => s.bitmap) ? "heatmap" : "overlay,heatmap");
    form.append("colormap", ui.colormap.value);
    const alpha = state.opacity;
    form.append("alpha", String(alpha));
    const started = performance.now();
    try {
      const response = await api("explain", { method: "POST", body: form, signal: abort.signal });
      if (run !== state.run) return;
      state.roundTripMs = performance.now() - started;
      state.response = response;
      state.shown = selection;
      state.responseAlpha = alpha;
      prepared = new Map();
      state.current = Math.min(state.current, response.results.length - 1);
      if (state.current < 0) state.current = 0;
      await show(state.current);
      if (run !== state.run) return;
      const count = response.results.length;
      setStatus(`Done: ${count} image${count === 1 ? "" : "s"} explained with ${methods.join(", ")}.`);
    } catch (err) {
      if (err.name === "AbortError" || run !== state.run) return;
      const names = files.map((f) => f.name).join(", ");
      showError(err, err instanceof ApiError && err.status === 415 ? names : "");
    } finally {
      if (run === state.run) {
        state.abort = null;
        document.body.dataset.busy = "false";
        ui.status.classList.remove("busy");
      }
    }
  }

  // ---------------------------------------------------------------- images

  function b64ToBlob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  async function pngDepth(file) {
    // IHDR bit depth is byte 24 of a PNG; Chromium shows 16-bit PNGs, but not windowed as the
    // service windows them, so those use the service's overlay.
    const head = new Uint8Array(await file.slice(0, 26).arrayBuffer());
    const isPng = head.length >= 25 && head[0] === 0x89 && head[1] === 0x50 && head[2] === 0x4e && head[3] === 0x47;
    return isPng ? head[24] : 0;
  }

  async function decodeSource(file, frame) {
    if ((await pngDepth(file)) === 16) return { reason: "16-bit PNG" };
    try {
      if (frame === 0) return { bitmap: await createImageBitmap(file) };
      // A later frame of an animated GIF/WebP: WebCodecs' ImageDecoder, where the browser has it.
      if (!("ImageDecoder" in window) || !file.type || !(await ImageDecoder.isTypeSupported(file.type))) {
        return { reason: "the browser cannot pick out this frame" };
      }
      const decoder = new ImageDecoder({ data: await file.arrayBuffer(), type: file.type });
      try {
        const { image } = await decoder.decode({ frameIndex: frame });
        const bitmap = await createImageBitmap(image);
        image.close();
        return { bitmap };
      } finally {
        decoder.close();
      }
    } catch {
      return { reason: "a format the browser cannot display" };
    }
  }

  function source(selection, index, frame) {
    const key = `${index}:${frame}`;
    if (!selection.sources.has(key)) selection.sources.set(key, decodeSource(selection.files[index], frame));
    return selection.sources.get(key);
  }

  async function prepare(result) {
    const decoded = await source(state.shown, result.image.index, result.image.frame);
    let bitmap = decoded.bitmap || null;
    let reason = decoded.reason || "";
    if (bitmap && (bitmap.width !== result.image.width || bitmap.height !== result.image.height)) {
      reason = `the browser decoded ${bitmap.width}×${bitmap.height}, the service ${result.image.width}×${result.image.height}`;
      bitmap = null;
    }
    const panels = await Promise.all(result.explanations.map(async (exp) => ({
      exp,
      heat: exp.heatmap_png ? await createImageBitmap(b64ToBlob(exp.heatmap_png, "image/png")) : null,
      overlay: exp.overlay_png ? await createImageBitmap(b64ToBlob(exp.overlay_png, "image/png")) : null,
    })));
    const blend = Boolean(bitmap) && panels.every((p) => p.heat);
    const first = panels[0] || {};
    const size = blend ? bitmap : (first.overlay || first.heat || { width: result.image.width, height: result.image.height });
    return {
      result, bitmap: blend ? bitmap : null, reason, panels, width: size.width, height: size.height,
      alpha: state.responseAlpha,
    };
  }

  // ---------------------------------------------------------------- showing a result

  async function show(index) {
    const results = state.response.results;
    state.current = index;
    const result = results[index];
    const run = state.run;
    if (!prepared.has(index)) prepared.set(index, prepare(result));
    let entry;
    try {
      entry = await prepared.get(index);
    } catch (err) {
      prepared.delete(index);
      showError(new Error(`The browser could not draw the maps of this image: ${err.message || err}`));
      return;
    }
    if (run !== state.run || state.current !== index) return;
    state.entry = entry;
    state.view = { zoom: 1, cx: 0.5, cy: 0.5 };
    ui.result.hidden = false;
    renderTitle(results, result);
    renderTimings();
    renderPredictions(result);
    renderPanels(entry);
    updateSlider(entry);
    updateZoomLabel();
  }

  function renderTitle(results, result) {
    const { index, frame, filename, width, height } = result.image;
    const frames = results.filter((r) => r.image.index === index).length;
    let title = `Image ${index + 1} of ${state.shown.files.length} · ${filename || "unnamed"}`;
    if (frames > 1) title += ` · frame ${frame + 1} of ${frames}`;
    ui.imageTitle.textContent = `${title} · ${width}×${height}`;
    ui.prev.disabled = state.current === 0;
    ui.next.disabled = state.current === results.length - 1;
    const many = results.length > 1;
    ui.prev.hidden = !many;
    ui.next.hidden = !many;
  }

  function renderTimings() {
    const t = state.response.timing_ms;
    const { model } = state.response;
    const items = [
      ["total", t.total], ["queue", t.queue], ["compute", t.compute], ["encode", t.encode],
      ["round trip", state.roundTripMs],
    ].map(([name, ms]) => [name, `${ms.toFixed(1)} ms`]);
    items.push(["model", `${model.name} ${model.version}`]);
    ui.timings.replaceChildren(...items.map(([name, value]) =>
      el("div", {}, el("dt", { textContent: name }), el("dd", { textContent: value }))));
  }

  const pct = (x) => `${(x * 100).toFixed(1)}%`;

  function renderPredictions(result) {
    const explained = new Set(result.explanations.map((e) => e.class_idx));
    ui.predictions.replaceChildren(...result.predictions.map((p) => {
      const bar = el("div", { className: "bar" }, el("span"));
      bar.firstChild.style.width = pct(p.score);
      const button = el("button", { type: "button", className: "link", textContent: "Explain" });
      button.setAttribute("aria-label", `Explain class ${p.label} (${p.class_idx})`);
      button.addEventListener("click", () => {
        ui.classIdx.value = String(p.class_idx);
        explain();
      });
      const item = el("li", { className: explained.has(p.class_idx) ? "pred explained" : "pred" },
        el("div", { className: "pred-top" },
          el("span", { className: "pred-label", textContent: p.label }),
          el("span", { className: "score", textContent: pct(p.score) })),
        bar,
        el("div", { className: "pred-bottom" },
          el("span", { className: "pred-idx", textContent: `class ${p.class_idx}` }), button));
      item.dataset.classIdx = String(p.class_idx);
      return item;
    }));
  }

  function methodTitle(name) {
    const method = state.methods.find((m) => m.name === name);
    return method ? method.title : name;
  }

  function renderPanels(entry) {
    const filename = entry.result.image.filename || "image";
    ui.panels.replaceChildren(...entry.panels.map((panel, i) => {
      const { exp } = panel;
      const canvas = el("canvas", { tabIndex: 0 });
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-describedby", "view-help");
      canvas.setAttribute("aria-label",
        `${methodTitle(exp.method)} map for ${exp.label} (class ${exp.class_idx}) over ${filename}`);
      canvas.style.aspectRatio = `${entry.width} / ${entry.height}`;
      canvas.style.maxHeight = "55vh";
      panel.canvas = canvas;
      attachViewControls(canvas);
      const download = el("button", { type: "button", className: "secondary", textContent: "Download overlay" });
      download.setAttribute("aria-label", `Download the ${methodTitle(exp.method)} overlay for ${exp.label} as PNG`);
      download.addEventListener("click", () => downloadOverlay(entry, panel));
      const caption = el("figcaption", {},
        el("span", { className: "title", textContent: methodTitle(exp.method) }),
        el("span", { className: "meta", textContent: `${exp.label} (${exp.class_idx}) · ${pct(exp.score)} · layer ${exp.target_layer}` }));
      const figure = el("figure", { className: "panel" }, caption, canvas);
      figure.dataset.method = exp.method;
      figure.dataset.classIdx = String(exp.class_idx);
      figure.dataset.index = String(i);
      if (!entry.bitmap) {
        const text = panel.overlay
          ? `The browser cannot re-blend this image (${entry.reason}): this is the service's overlay at ` +
            `${Math.round(entry.alpha * 100)}% opacity, and the opacity slider is off.`
          : `The browser cannot show this image (${entry.reason}): only the map is drawn.`;
        figure.append(el("p", { className: "note", textContent: text }));
      }
      figure.append(el("div", { className: "actions" }, download));
      return figure;
    }));
    resizeObserver.disconnect();
    for (const panel of entry.panels) resizeObserver.observe(panel.canvas);
    drawAll();
  }

  function updateSlider(entry) {
    ui.opacity.disabled = !entry.bitmap;
  }

  // ---------------------------------------------------------------- drawing

  function geometry(canvas, entry) {
    const cssW = canvas.clientWidth || 1;
    const cssH = canvas.clientHeight || 1;
    const fit = Math.min(cssW / entry.width, cssH / entry.height);
    const scale = fit * state.view.zoom;
    const tx = cssW / 2 - state.view.cx * entry.width * scale;
    const ty = cssH / 2 - state.view.cy * entry.height * scale;
    return { cssW, cssH, fit, scale, tx, ty };
  }

  function compose(ctx, entry, panel) {
    if (entry.bitmap) {
      ctx.drawImage(entry.bitmap, 0, 0, entry.width, entry.height);
      ctx.globalAlpha = state.opacity;
      ctx.drawImage(panel.heat, 0, 0, entry.width, entry.height);
      ctx.globalAlpha = 1;
    } else if (panel.overlay) {
      ctx.drawImage(panel.overlay, 0, 0, entry.width, entry.height);
    } else if (panel.heat) {
      ctx.drawImage(panel.heat, 0, 0, entry.width, entry.height);
    }
  }

  function draw(panel) {
    const entry = state.entry;
    const canvas = panel.canvas;
    if (!entry || !canvas || !canvas.isConnected) return;
    const dpr = window.devicePixelRatio || 1;
    const g = geometry(canvas, entry);
    const w = Math.max(1, Math.round(g.cssW * dpr));
    const h = Math.max(1, Math.round(g.cssH * dpr));
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.setTransform(g.scale * dpr, 0, 0, g.scale * dpr, g.tx * dpr, g.ty * dpr);
    // Zoomed in past 2 screen pixels per image pixel, show pixels as blocks: that is what
    // inspecting detail means. Fitted, a small image is smoothed like any picture.
    ctx.imageSmoothingEnabled = state.view.zoom === 1 || g.scale * dpr < 2;
    compose(ctx, entry, panel);
    canvas.dataset.opacity = entry.bitmap ? String(state.opacity) : "service";
    canvas.dataset.drawn = String(Number(canvas.dataset.drawn || 0) + 1);
  }

  function drawAll() {
    if (state.entry) for (const panel of state.entry.panels) draw(panel);
  }

  const resizeObserver = new ResizeObserver(() => drawAll());

  // ---------------------------------------------------------------- zoom and pan

  function clampView() {
    const v = state.view;
    v.zoom = Math.min(MAX_ZOOM, Math.max(1, v.zoom));
    // Keep the centre inside the image, tighter as the view covers more of it.
    const half = 0.5 / v.zoom;
    v.cx = Math.min(1 - half, Math.max(half, v.cx));
    v.cy = Math.min(1 - half, Math.max(half, v.cy));
  }

  function zoomAt(factor, canvas, px, py) {
    const entry = state.entry;
    if (!entry) return;
    const before = canvas ? geometry(canvas, entry) : null;
    state.view.zoom *= factor;
    if (before && px !== undefined) {
      // Keep the image point under the pointer where it is.
      const ix = (px - before.tx) / before.scale;
      const iy = (py - before.ty) / before.scale;
      const scale = before.fit * Math.min(MAX_ZOOM, Math.max(1, state.view.zoom));
      state.view.cx = (before.cssW / 2 - (px - ix * scale)) / (entry.width * scale);
      state.view.cy = (before.cssH / 2 - (py - iy * scale)) / (entry.height * scale);
    }
    clampView();
    drawAll();
    updateZoomLabel();
  }

  function panBy(dxCss, dyCss, canvas) {
    const entry = state.entry;
    if (!entry) return;
    const g = geometry(canvas, entry);
    state.view.cx -= dxCss / (entry.width * g.scale);
    state.view.cy -= dyCss / (entry.height * g.scale);
    clampView();
    drawAll();
  }

  function updateZoomLabel() {
    const entry = state.entry;
    const canvas = entry && entry.panels[0] && entry.panels[0].canvas;
    if (!canvas) return;
    const g = geometry(canvas, entry);
    const native = `${Math.round(g.scale * 100)}%`;
    ui.zoomValue.textContent = state.view.zoom === 1 ? `fit ${native}` : native;
    ui.zoomOut.disabled = state.view.zoom <= 1;
    ui.zoomIn.disabled = state.view.zoom >= MAX_ZOOM;
  }

  function attachViewControls(canvas) {
    let drag = null;
    canvas.addEventListener("pointerdown", (event) => {
      drag = { x: event.clientX, y: event.clientY };
      canvas.setPointerCapture(event.pointerId);
      canvas.classList.add("dragging");
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drag) return;
      panBy(event.clientX - drag.x, event.clientY - drag.y, canvas);
      drag = { x: event.clientX, y: event.clientY };
    });
    const end = () => { drag = null; canvas.classList.remove("dragging"); };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      const rect = canvas.getBoundingClientRect();
      zoomAt(event.deltaY < 0 ? 1.25 : 0.8, canvas, event.clientX - rect.left, event.clientY - rect.top);
    }, { passive: false });
    canvas.addEventListener("keydown", (event) => {
      const step = 40;
      const actions = {
        ArrowLeft: () => panBy(step, 0, canvas), ArrowRight: () => panBy(-step, 0, canvas),
        ArrowUp: () => panBy(0, step, canvas), ArrowDown: () => panBy(0, -step, canvas),
        "+": () => zoomAt(1.25, canvas), "=": () => zoomAt(1.25, canvas),
        "-": () => zoomAt(0.8, canvas), "0": () => zoomAt(1 / state.view.zoom, canvas),
      };
      const action = actions[event.key];
      if (action) { event.preventDefault(); action(); }
    });
  }

  // ---------------------------------------------------------------- download

  function downloadOverlay(entry, panel) {
    const { exp } = panel;
    const stem = (entry.result.image.filename || "image").replace(/\.[^.]+$/, "");
    const frame = entry.result.image.frame ? `_frame${entry.result.image.frame}` : "";
    const name = `${stem}${frame}_${exp.method}_${exp.class_idx}_overlay.png`;
    const save = (href) => {
      const link = el("a", { href, download: name });
      document.body.append(link);
      link.click();
      link.remove();
    };
    if (!entry.bitmap) {
      save(`data:image/png;base64,${exp.overlay_png}`);
      return;
    }
    // The blend as shown (current opacity), at the image's own size.
    const canvas = el("canvas", { width: entry.width, height: entry.height });
    compose(canvas.getContext("2d"), entry, panel);
    canvas.toBlob((blob) => {
      const url = URL.createObjectURL(blob);
      save(url);
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }, "image/png");
  }

  // ---------------------------------------------------------------- wiring

  ui.form.addEventListener("submit", (event) => { event.preventDefault(); explain(); });
  ui.file.addEventListener("change", () => setFiles(ui.file.files));

  ["dragenter", "dragover"].forEach((type) => window.addEventListener(type, (event) => {
    event.preventDefault();
    ui.dropzone.classList.add("over");
  }));
  ["dragleave", "dragend"].forEach((type) => window.addEventListener(type, (event) => {
    if (event.type === "dragend" || !event.relatedTarget) ui.dropzone.classList.remove("over");
  }));
  window.addEventListener("drop", (event) => {
    // Dropping anywhere on the page counts: the browser must not navigate to the file.
    event.preventDefault();
    ui.dropzone.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) setFiles(event.dataTransfer.files);
  });

  ui.opacity.addEventListener("input", () => {
    state.opacity = Number(ui.opacity.value) / 100;
    ui.opacityValue.textContent = `${ui.opacity.value}%`;
    drawAll();  // no request: the blend is redone from the heatmaps already here
  });

  ui.colormap.addEventListener("change", () => { if (state.response) explain(); });
  ui.model.addEventListener("change", async () => {
    ui.layer.value = "";
    await loadLayers();
    if (state.response) setStatus("Model changed: press Explain to run it.");
  });
  ui.classClear.addEventListener("click", () => {
    ui.classIdx.value = "";
    if (state.response) explain();
  });
  ui.apiKey.addEventListener("change", () => {
    const key = ui.apiKey.value.trim();
    try { key ? sessionStorage.setItem(KEY_STORE, key) : sessionStorage.removeItem(KEY_STORE); } catch { /* private mode */ }
    clearError();
    loadCatalog();
  });
  ui.bannerClose.addEventListener("click", () => { clearError(); ui.run.focus(); });

  ui.prev.addEventListener("click", () => { if (state.current > 0) show(state.current - 1); });
  ui.next.addEventListener("click", () => {
    if (state.response && state.current < state.response.results.length - 1) show(state.current + 1);
  });
  ui.zoomIn.addEventListener("click", () => zoomAt(1.5));
  ui.zoomOut.addEventListener("click", () => zoomAt(1 / 1.5));
  ui.zoomFit.addEventListener("click", () => zoomAt(1 / state.view.zoom));
  window.addEventListener("resize", updateZoomLabel);

  try { ui.apiKey.value = sessionStorage.getItem(KEY_STORE) || ""; } catch { /* private mode */ }
  state.opacity = Number(ui.opacity.value) / 100;
  document.body.dataset.busy = "false";
  loadCatalog();
})();
