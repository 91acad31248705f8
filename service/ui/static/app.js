// camserve review page: plain JavaScript, no build step, no third-party code.
//
// Every image is blended in the browser. The page asks POST /explain (and POST /jobs for slow
// methods) for outputs=mask,image: the 8-bit frame exactly as the service windowed and displayed
// it, and each map as base64 float32 at that frame's size. Colour map, opacity and "fade low
// values" are applied here with the service's own colour tables (/ui/static/colormaps.json) and
// the blend formula of service/imaging/colormaps.py, so changing them sends no request, and the
// picture is the one overlay_png would give for the same options.
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
  const REPORT_MIN_SIDE = 512;   // a report's image is drawn at least this large (longer side)
  // DICOM results (issue 18), asked for when every file of a run is DICOM: a parametric map per
  // panel and a report per file; a source without patient geometry cannot carry a parametric
  // map (the service answers 422 saying so), so the page asks for secondary captures instead.
  const DICOM_OUTPUTS = ["dicom_pm", "dicom_sr"];
  const DICOM_FALLBACK = ["dicom_sc", "dicom_sr"];

  const ui = {
    form: $("#controls"), file: $("#file"), dropzone: $("#dropzone"), fileList: $("#file-list"),
    model: $("#model"), methods: $("#methods"), layer: $("#layer"), classIdx: $("#class-idx"),
    classClear: $("#class-clear"), colormap: $("#colormap"), apiKey: $("#api-key"), run: $("#run"),
    methodParams: $("#method-params"), windowPreset: $("#window-preset"), windowCustom: $("#window-custom"),
    windowCentre: $("#window-centre"), windowWidth: $("#window-width"), windowApply: $("#window-apply"),
    banner: $("#banner"), bannerTitle: $("#banner-title"), bannerMessage: $("#banner-message"),
    bannerId: $("#banner-id"), bannerClose: $("#banner-close"), status: $("#status"),
    jobs: $("#jobs"), staleNote: $("#stale-note"), warnings: $("#warnings"), windowInfo: $("#window-info"),
    dicomReport: $("#dicom-report"),
    tabs: $("#source-tabs"), tabUpload: $("#tab-upload"), tabPacs: $("#tab-pacs"),
    uploadPanel: $("#upload-panel"), pacsPanel: $("#pacs-panel"), studyUid: $("#study-uid"),
    seriesUid: $("#series-uid"), pacsReach: $("#pacs-reach"),
    pacsOutcome: $("#pacs-outcome"), pacsStoreBar: $("#pacs-store-bar"), pacsStore: $("#pacs-store"),
    pacsSearchFields: $("#pacs-search-fields"), pacsPatient: $("#pacs-patient"), pacsPatientId: $("#pacs-patient-id"),
    pacsDateFrom: $("#pacs-date-from"), pacsDateTo: $("#pacs-date-to"), pacsModality: $("#pacs-modality"),
    pacsAccession: $("#pacs-accession"), pacsSearch: $("#pacs-search"), pacsBrowser: $("#pacs-browser"),
    pacsBrowseStatus: $("#pacs-browse-status"), pacsStudies: $("#pacs-studies"), pacsStudyRows: $("#pacs-study-rows"),
    pacsMore: $("#pacs-more"), pacsSeries: $("#pacs-series"), pacsSeriesTitle: $("#pacs-series-title"),
    pacsSeriesList: $("#pacs-series-list"), pacsViewer: $("#pacs-viewer"), pacsPrev: $("#pacs-prev"),
    pacsNext: $("#pacs-next"), pacsPosition: $("#pacs-position"), pacsImage: $("#pacs-image"),
    pacsImageInfo: $("#pacs-image-info"), pacsExplainImage: $("#pacs-explain-image"),
    pacsExplainSeries: $("#pacs-explain-series"),
    result: $("#result"), imageTitle: $("#image-title"), prev: $("#prev"), next: $("#next"),
    timings: $("#timings"), predictions: $("#predictions"), opacity: $("#opacity"),
    opacityValue: $("#opacity-value"), fade: $("#fade"), showOriginal: $("#show-original"),
    colorbar: $("#colorbar"), panels: $("#panels"),
    zoomIn: $("#zoom-in"), zoomOut: $("#zoom-out"), zoomFit: $("#zoom-fit"), zoomValue: $("#zoom-value"),
  };

  const state = {
    models: [], methods: [], tables: {}, catalogReady: false,
    selection: null,      // the files last picked or dropped: {files}
    response: null,       // the ExplainResponse shown (the parts of one run merged)
    shown: null,          // the selection that response answers (a newer one may have failed)
    request: null,        // what the shown response was asked with: {methods, window}
    roundTripMs: 0,
    current: 0,           // index into response.results
    entry: null,          // the prepared current result: its image and panels
    opacity: 0.5,
    view: { zoom: 1, cx: 0.5, cy: 0.5 },  // shared by every panel; centre in image fractions
    run: 0,               // id of the latest run: older answers are dropped
    abort: null,
    jobs: [],             // the latest run's jobs: {id, method, row, ...}
    source: "upload",     // the tab in use: "upload" or "pacs" (when the service has a PACS)
    lastPacs: null,       // what the latest PACS run explained: {study_uid, series_uid, instance_uids}
    store: null,          // the shown PACS result's "Store to PACS": {parts, study_uid, skipped, status, stored}
  };
  let prepared = new Map();        // result index -> Promise of its prepared entry, per response

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, code, message, requestId, retryAfter) {
      super(message);
      Object.assign(this, { status, code, requestId, retryAfter });
    }
  }

  function authHeaders(extra = {}) {
    const headers = new Headers(extra);
    const key = ui.apiKey.value.trim();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    return headers;
  }

  async function send(path, options = {}) {
    try {
      return await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network", "The service did not answer. Is it running, and is the address right?", "", null);
    }
  }

  async function failure(response) {
    let body = null;
    try { body = JSON.parse(await response.text()); } catch { body = null; }
    const detail = (body && body.error) || {};
    return new ApiError(
      response.status, detail.code || `http_${response.status}`,
      detail.message || `${response.status} ${response.statusText}`.trim(),
      detail.request_id || response.headers.get("X-Request-ID") || "",
      response.headers.get("Retry-After"),
    );
  }

  async function api(path, options = {}) {
    const response = await send(path, options);
    if (!response.ok) throw await failure(response);
    const text = await response.text();
    try { return text ? JSON.parse(text) : null; } catch { return null; }
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

  // What a 504 means, from the service's message: where the deadline passed decides the advice.
  function timeoutAdvice(message, images) {
    if (/while it was computed/i.test(message)) {
      return " The service was computing the explanation when its deadline passed, and stopped." +
        " Slow methods (the Score-CAM family, ablation) run here as jobs with a progress bar;" +
        " otherwise ask for fewer methods or classes at once.";
    }
    if (/while decoding/i.test(message)) {
      return images > 1
        ? " The deadline passed while the files were still being read: send fewer frames or files at once."
        : " The deadline passed while the file was still being read: it may have too many frames.";
    }
    return " Nothing was computed: the deadline passed while the request waited for the busy" +
      " service. Try again in a moment.";
  }

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
      const count = state.selection ? state.selection.files.length : 1;
      message += count > 1 ? " Send fewer or smaller files." : " Send a smaller file.";
    } else if (status === 503) {
      message += err.retryAfter ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
    } else if (status === 504) {
      message += timeoutAdvice(err.message || "", state.selection ? state.selection.files.length : 1);
    }
    ui.bannerTitle.textContent = (TITLES[status] || "Something went wrong") + (context ? ` (${context})` : "");
    ui.bannerMessage.textContent = message;
    ui.bannerId.textContent = err.requestId ? `request id ${err.requestId}` : "";
    ui.banner.hidden = false;
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
        const [models, methods, tables] = await Promise.all(
          [api("models"), api("methods"), api("ui/static/colormaps.json")]);
        state.models = models.models;
        state.methods = methods.methods;
        state.tables = flatTables(tables.colormaps);
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
    fillColormaps();
    state.catalogReady = true;
    await Promise.all([loadLayers(), loadPacs()]);
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
        const label = el("label", { title: `${m.title}: ${m.passes}. ${m.paper}` }, box, m.title);
        if (isHeavy(m)) label.append(el("span", { className: "job-tag", textContent: "job", title: "slow: runs as a job with progress and Cancel" }));
        nodes.push(label);
      }
    }
    ui.methods.replaceChildren(...nodes);
    if (!checkedMethods().length && state.methods.length) ui.methods.querySelector("input").checked = true;
  }

  // Slow methods run as jobs. GET /methods says so with `heavy` where the service has it; else
  // the perturbation family and any method whose passes grow with the channels or positions.
  function isHeavy(method) {
    if (typeof method.heavy === "boolean") return method.heavy;
    return method.family === "perturbation" || /\bper (non-zero )?(channel|position)/.test(method.passes || "");
  }

  function heavyMethod(name) {
    const method = state.methods.find((m) => m.name === name);
    return Boolean(method && isHeavy(method));
  }

  // name -> Uint8Array(768): the service's 256 RGB entries, flattened.
  function flatTables(colormaps) {
    const out = {};
    for (const [name, rows] of Object.entries(colormaps)) out[name] = Uint8Array.from(rows.flat());
    return out;
  }

  function fillColormaps() {
    const previous = ui.colormap.value || "jet";
    const names = Object.keys(state.tables);
    ui.colormap.replaceChildren(...names.map((name) => el("option", { value: name, textContent: name })));
    ui.colormap.value = names.includes(previous) ? previous : names[0];
    drawColorbar();
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

  // ---------------------------------------------------------------- PACS (issue 19)

  // GET /readyz names a `pacs` only when the service was started with CAMSERVE_DICOMWEB_URL:
  // then the page offers its PACS tab. The answer's body counts even when it is a 503.
  async function loadPacs() {
    let health = null;
    try {
      const response = await send("readyz");
      health = await response.json();
    } catch { health = null; }
    const pacs = health && typeof health.pacs === "string" ? health.pacs : null;
    ui.tabs.hidden = !pacs;
    if (!pacs && state.source === "pacs") selectSource("upload");
    ui.pacsReach.textContent = pacs && pacs !== "reachable" ? `The PACS is ${pacs}.` : "";
    ui.tabPacs.title = pacs ? `PACS ${pacs}` : "";
  }

  function selectSource(source) {
    state.source = source;
    const pacs = source === "pacs";
    ui.tabUpload.setAttribute("aria-selected", String(!pacs));
    ui.tabPacs.setAttribute("aria-selected", String(pacs));
    ui.tabUpload.tabIndex = pacs ? -1 : 0;
    ui.tabPacs.tabIndex = pacs ? 0 : -1;
    ui.uploadPanel.hidden = pacs;
    ui.pacsPanel.hidden = !pacs;
    ui.pacsBrowser.hidden = !pacs;
    if (!state.response && document.body.dataset.busy !== "true") {
      setStatus(pacs ? "Search the PACS, open a study and a series, then explain an image or the series."
        : "Choose or drop images to start.");
    }
    if (pacs && !browse.searched) searchStudies();  // the PACS's first studies, unfiltered
    ui.run.textContent = pacs ? "Explain study" : "Explain";
    // DICOMweb's body takes no window: a study is windowed as its files say.
    ui.windowPreset.disabled = pacs;
    if (pacs) ui.windowCustom.hidden = true;
    else ui.windowCustom.hidden = ui.windowPreset.value !== "custom";
  }

  // A class field of "285" or "285,281" as the JSON body takes it; anything else is sent as
  // typed so that the service's own message says what is wrong with it.
  function classValue(text) {
    if (!text) return null;
    const parts = text.split(",").map((part) => part.trim());
    const numbers = parts.map(Number);
    if (parts.some((part) => !/^-?\d+$/.test(part))) return text;
    return numbers.length === 1 ? numbers[0] : numbers;
  }

  function pacsBody(progress, methods, dicom) {
    const { pacs } = progress.selection;
    const body = {
      study_uid: pacs.study_uid, methods: methods.join(","), model: ui.model.value,
      topk: TOPK, outputs: ["mask", "image", ...dicom].join(","), mask_size: "original",
      mask_encoding: "base64", store: false,  // stored afterwards, by "Store to PACS"
    };
    if (pacs.series_uid) body.series_uid = pacs.series_uid;
    if (pacs.instance_uids) body.instance_uids = pacs.instance_uids;
    if (ui.layer.value) body.target_layer = ui.layer.value;
    const cls = classValue(ui.classIdx.value.trim());
    if (cls !== null) body.class_idx = cls;
    const own = Object.fromEntries(Object.entries(progress.params).filter(([name]) => methods.includes(name)));
    if (Object.keys(own).length) body.method_params = own;
    return body;
  }

  // One part of a run as the service takes it: a PACS run names the study in a JSON body (for
  // POST /dicomweb/explain, or POST /jobs for slow methods), an upload sends its files as a form.
  function partRequest(progress, methods, kinds) {
    if (progress.selection.pacs) {
      return { headers: { "Content-Type": "application/json" }, body: JSON.stringify(pacsBody(progress, methods, kinds)) };
    }
    return { body: baseForm(progress.selection.files, methods, progress.window, progress.params, kinds) };
  }

  // A PACS answer is an /explain response plus what it skipped (not images); the parts of a run
  // skip the same instances, so each is listed once.
  function notePacsOutcome(progress, response) {
    if (!progress.selection.pacs) return;
    const seen = new Set(progress.skipped.map((row) => row.sop_instance_uid));
    progress.skipped.push(...(response.skipped || []).filter((row) => !seen.has(row.sop_instance_uid)));
    renderPacsOutcome(progress.selection.pacs.study_uid, null, progress.skipped);
  }

  function uidList(title, rows, text) {
    return [el("strong", { textContent: title }), el("ul", {}, ...rows.map((row) => el("li", { textContent: text(row) })))];
  }

  // The SOP classes the service stores, by name; any other is shown by its UID.
  const SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR (report)",
  };

  // ``stored``: what "Store to PACS" stored (null before it is pressed).
  function renderPacsOutcome(studyUid, stored, skipped) {
    const nodes = [];
    if (stored) {
      nodes.push(...uidList(`Stored to PACS: ${stored.length} object${stored.length === 1 ? "" : "s"} in study ${studyUid}`,
        stored, (row) => `${SOP_CLASSES[row.sop_class_uid] || `SOP class ${row.sop_class_uid}`} · ` +
          `series ${row.series_instance_uid} · instance ${row.sop_instance_uid}`));
    }
    if (skipped.length) {
      nodes.push(...uidList(`Skipped: ${skipped.length} instance${skipped.length === 1 ? "" : "s"}`,
        skipped, (row) => `${row.sop_instance_uid}: ${row.reason}`));
    }
    ui.pacsOutcome.replaceChildren(...nodes);
    ui.pacsOutcome.hidden = !nodes.length;
    ui.pacsOutcome.dataset.stored = String(stored ? stored.length : 0);
  }

  // ---------------------------------------------------------------- Store to PACS (issue 19)

  // The page never sends DICOM to write into the PACS: "Store to PACS" sends each part of the
  // shown run again, the same UIDs, methods, classes, layer, model and parameters, with
  // store: true, and the service recomputes the maps (deterministic, seeded where random) and
  // stores them. A series part runs as a job again, with its progress bar. Only the DICOM
  // outputs are asked back (the maps are on the page already), with the secondary capture
  // beside each parametric map: the map's picture, for viewers that cannot draw a map.
  function storeOutputs(outputs) {
    const kinds = outputs.split(",").filter((kind) => kind.startsWith("dicom_"));
    if (kinds.includes("dicom_pm") && !kinds.includes("dicom_sc")) kinds.push("dicom_sc");
    return kinds.join(",");
  }

  // A part of a PACS run that was shown: what it asked, to be asked again by the store.
  function notePart(progress, job, methods, request) {
    if (progress.selection.pacs) progress.parts.push({ job, methods, body: JSON.parse(request.body), stored: null });
  }

  function renderStoreBar() {
    const store = state.store;
    ui.pacsStoreBar.hidden = !store;
    if (!store) return;
    ui.pacsStore.disabled = store.status !== "ready" || Boolean(store.blocked);
    ui.pacsStore.textContent = store.status === "storing" ? "Storing to PACS…"
      : store.status === "stored" ? "Stored to PACS" : "Store to PACS";
    ui.pacsStoreBar.dataset.status = store.status;
  }

  async function storeShown() {
    const store = state.store;
    if (!store || store.status !== "ready" || store.blocked) return;
    clearError();
    store.status = "storing";
    renderStoreBar();
    setStatus(`Storing the results into study ${store.study_uid}…`, true);
    let failed = null;
    for (const part of store.parts.filter((p) => !p.stored)) {
      // A part stored before a later one failed is not stored twice when the button is pressed again.
      const body = JSON.stringify({ ...part.body, store: true, outputs: storeOutputs(part.body.outputs) });
      const request = { method: "POST", headers: { "Content-Type": "application/json" }, body };
      try {
        const answer = part.job ? await storeJob(part.methods, request) : await api("dicomweb/explain", request);
        part.stored = answer.stored || [];
      } catch (err) {
        failed = err;
        break;
      }
    }
    const stored = store.parts.flatMap((p) => p.stored || []);
    store.status = failed ? "ready" : "stored";
    if (state.store === store) {
      // A failure lists only what earlier parts did store, if any.
      renderPacsOutcome(store.study_uid, failed && !stored.length ? null : stored, store.skipped);
      renderStoreBar();
      if (failed) showError(failed, "Store to PACS");
      setStatus(failed ? `Not stored: ${failed.message}` : `Stored ${stored.length} object${stored.length === 1 ? "" : "s"} into study ${store.study_uid}.`);
    }
    // What was stored is in the study now: its new series show in the browser.
    if (stored.length && browse.study && browse.study.study_uid === store.study_uid) loadSeries(store.study_uid, false);
  }

  // A series stored as a job, as it was explained: its own progress row, and Cancel.
  async function storeJob(methods, request) {
    const view = jobRow(methods, `Store to PACS: ${methods.map(methodTitle).join(", ")}`);
    const job = { methods, id: null, ...view, finished: false };
    ui.jobs.hidden = false;
    view.cancel.addEventListener("click", () => cancelJobs([job]));
    try {
      const submitted = await api("jobs", request);
      job.id = submitted.job_id;
      job.row.dataset.jobId = job.id;
      showProgress(job, submitted.progress, submitted.eta_s, submitted.status);
      if (job.cancelRequested) await cancelJobs([job]);
      const final = await followJob(job, undefined);
      job.finished = true;
      finishJob(null, job, final);
      if (final.status === "cancelled") throw new Error("The store was cancelled: nothing more was stored");
      if (final.status !== "succeeded") throw jobError(final);
      return final.result;
    } catch (err) {
      if (!job.finished) {
        job.row.dataset.status = "failed";
        job.text.textContent = `failed: ${err.message}`;
        job.cancel.disabled = true;
      }
      throw err;
    } finally {
      job.finished = true;
    }
  }

  // ---------------------------------------------------------------- PACS browser (issue 19)

  // The page asks the service (GET /dicomweb/...), never the PACS itself: the service searches
  // with QIDO-RS and renders a frame retrieved with WADO-RS through its own decoder and window,
  // the picture an explanation of that frame would be drawn on.
  const STUDIES_PAGE = 25;
  const browse = {
    searched: false, searches: 0, query: null, offset: 0, studies: [],  // the latest search, what it found
    study: null, series: null,   // the study and series opened
    images: [], steps: [0],      // the series' images in viewing order; frames before each (and all)
    at: 0, token: 0, url: null,  // the step shown; the latest preview asked for; its blob URL
    loading: null,               // the AbortController of the picture on its way
  };
  const enc = encodeURIComponent;

  function browseStatus(text) { ui.pacsBrowseStatus.textContent = text; }

  function plural(n, one, many = `${one}s`) { return `${n} ${n === 1 ? one : many}`; }

  // The search fields as the service's query: one date alone is that day, two are a range.
  function searchQuery() {
    const from = ui.pacsDateFrom.value.replaceAll("-", "");
    const to = ui.pacsDateTo.value.replaceAll("-", "");
    const date = from && to && from !== to ? `${from}-${to}` : from || to;
    const query = {
      patient: ui.pacsPatient.value.trim(), patient_id: ui.pacsPatientId.value.trim(), date,
      modality: ui.pacsModality.value.trim(), accession: ui.pacsAccession.value.trim(),
    };
    return Object.fromEntries(Object.entries(query).filter(([, value]) => value));
  }

  async function searchStudies(more = false) {
    clearError();
    browse.searched = true;
    if (!more) Object.assign(browse, { query: searchQuery(), offset: 0, studies: [] });
    const params = new URLSearchParams({ ...browse.query, limit: String(STUDIES_PAGE), offset: String(browse.offset) });
    browseStatus("Searching the PACS…");
    ui.pacsSearch.disabled = true;
    const token = ++browse.searches;  // an older search's answer, arriving late, is dropped
    try {
      const found = await api(`dicomweb/studies?${params}`);
      if (token !== browse.searches) return;
      browse.studies.push(...found.studies);
      browse.offset += found.studies.length;
      renderStudies(found.more);
      const n = browse.studies.length;
      browseStatus(n ? `${plural(n, "study", "studies")}${found.more ? " so far" : ""} found: open one to see its series.`
        : "No study matches: widen the search (* matches any characters).");
    } catch (err) {
      if (token !== browse.searches) return;
      browseStatus("The search did not finish.");
      showError(err, "PACS search");
    } finally {
      if (token === browse.searches) ui.pacsSearch.disabled = false;
    }
  }

  function markCurrent(nodes, test) {
    for (const node of nodes) {
      if (test(node)) node.setAttribute("aria-current", "true");
      else node.removeAttribute("aria-current");
    }
  }

  function renderStudies(more) {
    ui.pacsStudyRows.replaceChildren(...browse.studies.map((study) => {
      const name = study.patient_name || "(no name)";
      const open = el("button", { type: "button", className: "link", textContent: name });
      open.setAttribute("aria-label", `Open the study of ${name}, ${study.date || "no date"}${study.description ? `, ${study.description}` : ""}`);
      open.addEventListener("click", () => openStudy(study));
      const cells = [study.patient_id, study.date, study.modalities.join(", "), study.accession, study.description,
        `${study.series_count ?? "?"} · ${study.instance_count ?? "?"}`];
      const row = el("tr", {}, el("td", {}, open), ...cells.map((text) => el("td", { textContent: text || "" })));
      row.dataset.studyUid = study.study_uid;
      return row;
    }));
    markCurrent(ui.pacsStudyRows.children, (row) => browse.study && row.dataset.studyUid === browse.study.study_uid);
    ui.pacsStudies.hidden = !browse.studies.length;
    ui.pacsMore.hidden = !more;
  }

  async function openStudy(study) {
    clearError();
    Object.assign(browse, { study, series: null, images: [], steps: [0] });
    ui.studyUid.value = study.study_uid;  // Explain study explains it as opened
    ui.seriesUid.value = "";
    markCurrent(ui.pacsStudyRows.children, (row) => row.dataset.studyUid === study.study_uid);
    ui.pacsViewer.hidden = true;
    await loadSeries(study.study_uid, true);
  }

  async function loadSeries(studyUid, focus) {
    if (focus) browseStatus("Listing the series…");
    try {
      const listed = await api(`dicomweb/studies/${enc(studyUid)}/series`);
      if (!browse.study || browse.study.study_uid !== studyUid) return;
      renderSeries(listed.series);
      if (focus) {
        browseStatus(`${plural(listed.series.length, "series", "series")} in the study: open one to step through its images.`);
        const first = ui.pacsSeriesList.querySelector("button");
        if (first) first.focus();
      }
    } catch (err) {
      browseStatus("The series could not be listed.");
      showError(err, "PACS series");
    }
  }

  function renderSeries(series) {
    const { study } = browse;
    ui.pacsSeriesTitle.textContent = `Series of ${study.patient_name || "the study"}${study.date ? ` · ${study.date}` : ""}`;
    ui.pacsSeriesList.replaceChildren(...series.map((s) => {
      const text = [s.number !== null ? `#${s.number}` : null, s.modality, s.description,
        s.instance_count !== null ? plural(s.instance_count, "instance") : null].filter(Boolean).join(" · ");
      const button = el("button", { type: "button", className: "secondary", textContent: text });
      button.dataset.seriesUid = s.series_uid;
      button.addEventListener("click", () => openSeries(s));
      return el("li", {}, button);
    }));
    markCurrent(ui.pacsSeriesList.querySelectorAll("button"),
      (button) => browse.series && button.dataset.seriesUid === browse.series.series_uid);
    ui.pacsSeries.hidden = false;
  }

  function seriesPath() {
    return `dicomweb/studies/${enc(browse.study.study_uid)}/series/${enc(browse.series.series_uid)}`;
  }

  async function openSeries(series) {
    clearError();
    browse.series = series;
    ui.seriesUid.value = series.series_uid;
    markCurrent(ui.pacsSeriesList.querySelectorAll("button"), (button) => button.dataset.seriesUid === series.series_uid);
    browseStatus("Listing the images…");
    try {
      const listed = await api(`${seriesPath()}/instances`);
      if (browse.series !== series) return;
      browse.images = listed.instances.filter((instance) => instance.image);
      // A multi-frame instance is stepped through frame by frame.
      browse.steps = browse.images.reduce((steps, image) => [...steps, steps[steps.length - 1] + image.frames], [0]);
      const others = listed.instances.length - browse.images.length;
      browseStatus(`${plural(browse.images.length, "image")} in series ${series.number ?? ""} ${series.modality || ""}` +
        (others ? `; ${plural(others, "other instance")} (reports, maps) not shown` : "") + ".");
      ui.pacsViewer.hidden = !browse.images.length;
      if (browse.images.length) {
        showStep(0);
        ui.pacsImage.focus();
      }
    } catch (err) {
      browseStatus("The images could not be listed.");
      showError(err, "PACS images");
    }
  }

  function stepCount() { return browse.steps[browse.steps.length - 1]; }

  function stepAt(at) {
    let k = 0;
    while (browse.steps[k + 1] <= at) k++;
    return { image: browse.images[k], frame: at - browse.steps[k] };
  }

  async function showStep(at) {
    const total = stepCount();
    if (!total) return;
    at = Math.max(0, Math.min(total - 1, at));
    browse.at = at;
    const { image, frame } = stepAt(at);
    ui.pacsPosition.textContent = `${at + 1} / ${total}`;
    ui.pacsPrev.disabled = at === 0;
    ui.pacsNext.disabled = at === total - 1;
    const frames = image.frames > 1 ? ` · frame ${frame + 1} of ${image.frames}` : "";
    ui.pacsImageInfo.textContent = `Instance ${image.number ?? "(no number)"}${frames} · ` +
      `${image.columns}×${image.rows} · ${image.sop_instance_uid}`;
    ui.pacsImage.alt = `Image ${at + 1} of ${total} of the series: instance ${image.number ?? ""}${frames}`;
    ui.pacsImage.dataset.pending = `${image.sop_instance_uid}/${frame}`;
    showResultFor(image, frame);
    const token = ++browse.token;
    // Stepping on before a picture came cancels it: only the latest one is wanted.
    if (browse.loading) browse.loading.abort();
    const loading = new AbortController();
    browse.loading = loading;
    try {
      const response = await send(`${seriesPath()}/instances/${enc(image.sop_instance_uid)}/preview?frame=${frame}`,
        { signal: loading.signal });
      if (!response.ok) throw await failure(response);
      const blob = await response.blob();
      if (token !== browse.token) return;
      if (browse.url) URL.revokeObjectURL(browse.url);
      browse.url = URL.createObjectURL(blob);
      ui.pacsImage.src = browse.url;
    } catch (err) {
      if (err.name !== "AbortError" && token === browse.token) showError(err, "PACS image");
    }
  }

  // Stepping through a series that was explained shows each image's maps too.
  function showResultFor(image, frame) {
    if (!state.response || !state.shown || !state.shown.pacs) return;
    const index = state.response.results.findIndex((r) =>
      r.image.filename === `${image.sop_instance_uid}.dcm` && r.image.frame === frame);
    if (index >= 0 && index !== state.current) show(index);
  }

  function explainShown(whole) {
    if (!browse.series || !stepCount()) return;
    const { image, frame } = stepAt(browse.at);
    const target = { study_uid: browse.study.study_uid, series_uid: browse.series.series_uid };
    if (whole) explain({ ...target, job: true, current: browse.at });
    else explain({ ...target, instance_uids: [image.sop_instance_uid], current: frame });
  }

  // ---------------------------------------------------------------- running

  function setFiles(fileList) {
    const files = [...fileList];
    if (!files.length) return;
    state.selection = { files };
    state.current = 0;
    if (state.source === "pacs") selectSource("upload");
    // Whether the files are DICOM is read from their bytes when a run starts (dicomSelection).
    ui.fileList.textContent = files.length === 1
      ? `Selected: ${files[0].name}`
      : `Selected ${files.length} files: ${files.map((f) => f.name).join(", ")}`;
    explain();
  }

  function chosenWindow() {
    const preset = ui.windowPreset.value;
    if (preset !== "custom") return preset;
    const centre = Number(ui.windowCentre.value);
    const width = Number(ui.windowWidth.value);
    if (ui.windowCentre.value.trim() === "" || !Number.isFinite(centre) || !Number.isFinite(width) || width < 1) {
      return null;
    }
    return `${centre},${width}`;
  }

  // The method_params JSON typed on the page: an object keyed by method, or null when empty.
  function parsedParams() {
    const text = ui.methodParams.value.trim();
    if (!text) return {};
    try {
      const value = JSON.parse(text);
      if (value && typeof value === "object" && !Array.isArray(value)) return value;
    } catch { /* reported below */ }
    return null;
  }

  // Part 10 files say "DICM" at bytes 128..131, whatever their name or type.
  async function isDicomFile(file) {
    if (file.size < 132) return false;
    try { return (await file.slice(128, 132).text()) === "DICM"; } catch { return false; }
  }

  async function dicomSelection(selection) {
    if (selection.dicom === undefined) {
      selection.dicom = (await Promise.all(selection.files.map(isDicomFile))).every(Boolean);
    }
    return selection.dicom;
  }

  // The DICOM outputs of one part of a run: only the first asks for the report (one per file),
  // every part for the map objects of its own methods.
  function dicomKinds(progress, first) {
    if (!progress.dicom) return [];
    return first ? progress.dicom : progress.dicom.filter((kind) => kind !== "dicom_sr");
  }

  // Asks with these DICOM outputs; a 422 saying the source cannot have a parametric map is
  // answered by asking once more with secondary captures (and by every later part of the run).
  async function withDicomFallback(progress, kinds, call) {
    try {
      return await call(kinds);
    } catch (err) {
      const refused = err instanceof ApiError && err.status === 422 && /parametric map/i.test(err.message);
      if (!refused || !kinds.includes("dicom_pm")) throw err;
      progress.dicom = DICOM_FALLBACK;
      return call(kinds.map((kind) => (kind === "dicom_pm" ? "dicom_sc" : kind)));
    }
  }

  function baseForm(files, methods, window, params = {}, dicom = []) {
    const form = new FormData();
    for (const file of files) form.append("file", file, file.name);
    form.append("model", ui.model.value);
    form.append("methods", methods.join(","));
    if (ui.layer.value) form.append("target_layer", ui.layer.value);
    if (ui.classIdx.value.trim()) form.append("class_idx", ui.classIdx.value.trim());
    form.append("topk", String(TOPK));
    // The frame as the service displayed it, and each map at that frame's size: the browser
    // colours and blends them itself, for every format (DICOM, TIFF and 16-bit PNG included).
    form.append("outputs", ["mask", "image", ...dicom].join(","));
    form.append("mask_size", "original");
    form.append("mask_encoding", "base64");
    if (window) form.append("window", window);
    // Each part of a run gets the parameters of its own methods only (the service refuses
    // parameters for a method it was not asked for).
    const own = Object.fromEntries(Object.entries(params).filter(([name]) => methods.includes(name)));
    if (Object.keys(own).length) form.append("method_params", JSON.stringify(own));
    return form;
  }

  function markStale(text) {
    const stale = Boolean(text) && Boolean(state.response);
    ui.result.classList.toggle("stale", stale);
    ui.result.dataset.stale = stale ? "true" : "false";
    ui.staleNote.hidden = !stale;
    ui.staleNote.textContent = stale ? text : "";
  }

  // ``target``: what of the PACS to explain, {study_uid, series_uid, instance_uids, job, current}
  // (the browser's buttons); else the UID fields'. Ignored on the Upload tab.
  async function explain(target = null) {
    clearError();
    const pacs = state.source === "pacs";
    const aim = target || { study_uid: ui.studyUid.value.trim(), series_uid: ui.seriesUid.value.trim() };
    if (pacs && !aim.study_uid) {
      showError(new Error("Type the Study Instance UID of the study to explain, or open one from a search."));
      ui.studyUid.focus();
      return;
    }
    // A PACS run has no files: it names a study (a series, instances) and every source is DICOM.
    const selection = pacs
      ? { files: [], dicom: true, pacs: { ...aim } }
      : state.selection;
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
    const window = chosenWindow();
    if (window === null) {
      showError(new Error("Type a window centre and a width of at least 1, then press Apply."));
      ui.windowCentre.focus();
      return;
    }
    const params = parsedParams();
    if (params === null) {
      showError(new Error('Method parameters must be a JSON object keyed by method, e.g. {"scorecam": {"top_k_channels": 128}}.'));
      ui.methodParams.focus();
      return;
    }
    if (state.abort) state.abort.abort();
    cancelJobs(state.jobs);
    const abort = new AbortController();
    state.abort = abort;
    const run = ++state.run;
    const { files } = selection;
    if (selection.pacs) {
      state.lastPacs = aim;
      if (aim.current !== undefined) state.current = aim.current;  // the image the viewer shows
    }
    const what = selection.pacs ? pacsWhat(selection.pacs)
      : files.length === 1 ? files[0].name : `${files.length} files`;
    setStatus(`Explaining ${what}…`, true);
    markStale("Outdated: these maps are from the previous run; a new one is in progress.");

    const fast = methods.filter((m) => !heavyMethod(m));
    const slow = methods.filter((m) => heavyMethod(m));
    const dicom = (await dicomSelection(selection)) ? DICOM_OUTPUTS : null;
    if (run !== state.run) return;
    const progress = {
      run, selection, methods, window, params, dicom, started: performance.now(), got: false, errors: [], cancelled: [],
      skipped: [], parts: [],
    };
    // A whole series from the browser runs as a job, fast methods too (one job for them).
    const asJob = Boolean(selection.pacs && selection.pacs.job);
    state.jobs = [];
    ui.jobs.replaceChildren();
    ui.jobs.hidden = !slow.length && !asJob;
    ui.pacsOutcome.hidden = true;
    if (state.store) state.store.blocked = true;  // until this run's result replaces it, or fails
    renderStoreBar();
    const parts = [];
    if (fast.length) {
      const kinds = dicomKinds(progress, true);
      parts.push(asJob ? runJob(progress, fast, abort, kinds) : runExplain(progress, fast, abort, kinds));
    }
    for (const method of slow) parts.push(runJob(progress, [method], abort, dicomKinds(progress, !parts.length)));
    await Promise.all(parts);
    if (run !== state.run) return;
    state.abort = null;
    if (state.store) state.store.blocked = false;
    if (progress.got && selection.pacs) {
      state.store = { parts: progress.parts, study_uid: selection.pacs.study_uid, skipped: progress.skipped, status: "ready" };
    } else if (progress.got) {
      state.store = null;
    }
    renderStoreBar();
    if (progress.got) {
      const count = state.response.results.length;
      let text = `Done: ${count} image${count === 1 ? "" : "s"} explained with ${methods.join(", ")}.`;
      if (progress.cancelled.length) text += ` Cancelled: ${progress.cancelled.join(", ")}.`;
      if (progress.errors.length) text += ` Failed: ${progress.errors.join(", ")} (see the message above).`;
      setStatus(text);
    } else {
      setStatus(progress.cancelled.length ? `Cancelled: ${progress.cancelled.join(", ")}.` : "");
      markStale(state.response ? "These maps are from the previous run: the new one did not finish." : "");
    }
  }

  function pacsWhat(pacs) {
    if (pacs.instance_uids) return `image ${pacs.instance_uids[0]} from the PACS`;
    if (pacs.series_uid) return `series ${pacs.series_uid} from the PACS`;
    return `study ${pacs.study_uid} from the PACS`;
  }

  // The same run again (a class picked from the predictions): the PACS target it explained.
  function rerun() { return explain(state.source === "pacs" ? state.lastPacs : null); }

  async function runExplain(progress, methods, abort, dicom) {
    try {
      const path = progress.selection.pacs ? "dicomweb/explain" : "explain";
      let request = null;
      const response = await withDicomFallback(progress, dicom, (kinds) => {
        request = partRequest(progress, methods, kinds);
        return api(path, { method: "POST", signal: abort.signal, ...request });
      });
      if (progress.run !== state.run) return;
      notePart(progress, false, methods, request);
      notePacsOutcome(progress, response);
      await accept(progress, response);
    } catch (err) {
      if (err.name === "AbortError" || progress.run !== state.run) return;
      progress.errors.push(methods.join(", "));
      const names = progress.selection.files.map((f) => f.name).join(", ");
      const context = progress.selection.pacs ? "PACS" : err instanceof ApiError && err.status === 415 ? names : "";
      showError(err, context);
    }
  }

  // Each part of a run (the fast methods' /explain, each job) is shown as soon as it arrives;
  // the first replaces the previous run's result, the others add their maps to it.
  async function accept(progress, response) {
    // From the run's start to this part's answer: with jobs, the time a person waited.
    state.roundTripMs = performance.now() - progress.started;
    if (!progress.got) {
      progress.got = true;
      state.response = response;
      state.shown = progress.selection;
      state.request = { methods: progress.methods, window: progress.window };
      state.current = Math.max(0, Math.min(state.current, response.results.length - 1));
      markStale("");
    } else {
      mergeInto(state.response, response, progress.methods);
    }
    prepared = new Map();
    await show(state.current);
  }

  function mergeInto(base, extra, order) {
    base.results.forEach((result, i) => {
      const more = extra.results[i];
      if (!more) return;
      result.explanations.push(...more.explanations);
      // Methods in the order they are ticked; classes keep their order within a method.
      const rank = (e) => order.indexOf(e.method);
      result.explanations = result.explanations
        .map((e, at) => [e, at]).sort((a, b) => rank(a[0]) - rank(b[0]) || a[1] - b[1]).map(([e]) => e);
      if (!result.image_png) result.image_png = more.image_png;
    });
    if (extra.dicom && extra.dicom.length) base.dicom = [...(base.dicom || []), ...extra.dicom];
    base.timing_ms = extra.timing_ms.total > base.timing_ms.total ? extra.timing_ms : base.timing_ms;
  }

  // ---------------------------------------------------------------- jobs

  function jobRow(methods, title = methods.map(methodTitle).join(", ")) {
    const bar = el("progress", { max: 1, value: 0 });
    bar.setAttribute("aria-label", `${title} progress`);
    const text = el("span", { className: "job-text", textContent: "submitting…" });
    const cancel = el("button", { type: "button", className: "secondary", textContent: "Cancel" });
    cancel.setAttribute("aria-label", `Cancel ${title}`);
    const row = el("div", { className: "job" }, el("span", { className: "job-title", textContent: title }), bar, text, cancel);
    row.dataset.method = methods.join(",");
    row.dataset.status = "submitting";
    ui.jobs.append(row);
    return { row, bar, text, cancel, title };
  }

  function seconds(s) {
    if (s === null || s === undefined) return "estimating time left";
    if (s < 1) return "under a second left";
    if (s < 90) return `about ${Math.round(s)} s left`;
    return `about ${Math.round(s / 60)} min left`;
  }

  function showProgress(job, p, eta, status) {
    job.bar.max = Math.max(1, p.total);
    job.bar.value = p.done;
    job.row.dataset.status = status;
    job.row.dataset.done = String(p.done);
    job.text.textContent = `${status === "queued" ? "queued · " : ""}${p.done} of ${p.total} passes · ` +
      `${Math.round((p.fraction || 0) * 100)}% · ${seconds(eta)}`;
  }

  async function runJob(progress, methods, abort, dicom) {
    const view = jobRow(methods);
    const job = { methods, id: null, ...view, finished: false };
    state.jobs.push(job);
    view.cancel.addEventListener("click", () => cancelJobs([job]));
    try {
      let request = null;
      const submitted = await withDicomFallback(progress, dicom, (kinds) => {
        request = partRequest(progress, methods, kinds);
        return api("jobs", { method: "POST", signal: abort.signal, ...request });
      });
      job.id = submitted.job_id;
      job.row.dataset.jobId = job.id;
      showProgress(job, submitted.progress, submitted.eta_s, submitted.status);
      if (job.cancelRequested) await cancelJobs([job]);
      const final = await followJob(job, abort.signal);
      job.finished = true;
      if (progress.run !== state.run) return;
      finishJob(progress, job, final);
      if (final.status === "succeeded") {
        notePart(progress, true, methods, request);
        notePacsOutcome(progress, final.result);
        await accept(progress, final.result);
      }
    } catch (err) {
      job.finished = true;
      if (err.name === "AbortError" || progress.run !== state.run) return;
      job.row.dataset.status = "failed";
      job.text.textContent = `failed: ${err.message}`;
      job.cancel.disabled = true;
      progress.errors.push(job.title);
      showError(err, job.title);
    }
  }

  // ``progress``: the run the job is a part of (null for a store's job: its caller reports).
  function finishJob(progress, job, final) {
    job.cancel.disabled = true;
    job.row.dataset.status = final.status;
    if (final.status === "succeeded") {
      showProgress(job, final.progress, 0, "succeeded");
      job.text.textContent = `done · ${final.progress.total} passes`;
    } else if (final.status === "cancelled") {
      job.text.textContent = `cancelled after ${final.progress.done} of ${final.progress.total} passes`;
      if (progress) progress.cancelled.push(job.title);
    } else {
      job.text.textContent = `failed: ${(final.error || {}).message || final.status}`;
      if (!progress) return;
      progress.errors.push(job.title);
      showError(jobError(final), job.title);
    }
  }

  // A failed job's error as the service's own answer would have carried it.
  function jobError(final) {
    const error = final.error || {};
    return new ApiError(error.code === "deadline_exceeded" ? 504 : 500, error.code || "failed",
      error.message || "the job failed", error.request_id || "", null);
  }

  // The job's server-sent events, read with fetch() so the API key header can be sent
  // (EventSource cannot send one): progress events, then one done event with the whole job.
  async function followJob(job, signal) {
    const response = await send(`jobs/${job.id}/events`, { signal, headers: { Accept: "text/event-stream" } });
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let type = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (!data.length) continue;  // a keep-alive comment
        const payload = JSON.parse(data.join("\n"));
        if (type === "progress") showProgress(job, payload, payload.eta_s, "running");
        if (type === "done") {
          reader.cancel().catch(() => {});
          return payload;
        }
      }
    }
    // The stream ended without its final event (a proxy cut it): ask for the job instead.
    return api(`jobs/${job.id}`, { signal });
  }

  async function cancelJobs(jobs) {
    await Promise.all(jobs.filter((job) => !job.finished).map(async (job) => {
      if (!job.id) { job.cancelRequested = true; return; }
      job.cancel.disabled = true;
      job.text.textContent = "cancelling…";
      try {
        await api(`jobs/${job.id}`, { method: "DELETE" });
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) showError(err, `cancelling ${job.title}`);
      }
    }));
  }

  // ---------------------------------------------------------------- images

  function b64Bytes(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  // The map as table indices at the image's size: i = clip(round(255 m), 0, 255), as
  // service.imaging.colormaps.to_indices computes them (nearest sampling if the sizes differ).
  function maskIndices(mask, width, height) {
    const [mh, mw] = mask.shape;
    const bytes = b64Bytes(mask.data);
    const values = new Float32Array(bytes.buffer, 0, mh * mw);
    const out = new Uint8ClampedArray(width * height);  // clamped, rounded half to even: np.rint
    for (let y = 0; y < height; y++) {
      const sy = mh === height ? y : Math.min(mh - 1, Math.floor((y + 0.5) * mh / height));
      for (let x = 0; x < width; x++) {
        const sx = mw === width ? x : Math.min(mw - 1, Math.floor((x + 0.5) * mw / width));
        out[y * width + x] = values[sy * mw + sx] * 255;
      }
    }
    return out;
  }

  // The blend of service/imaging/colormaps.py, pixel for pixel:
  //   a = alpha (uniform) or alpha * i / 255 (fade);  out = round((1 - a) * v + a * colour[i]).
  function blendPixels(base, indices, table, alpha, fade, out) {
    for (let p = 0, q = 0; p < indices.length; p++, q += 4) {
      const i = indices[p];
      const a = fade ? alpha * i / 255 : alpha;
      const keep = 1 - a;
      out[q] = keep * base[q] + a * table[3 * i];
      out[q + 1] = keep * base[q + 1] + a * table[3 * i + 1];
      out[q + 2] = keep * base[q + 2] + a * table[3 * i + 2];
      out[q + 3] = 255;
    }
  }

  async function prepare(result) {
    if (!result.image_png) throw new Error("the service sent no image for this result");
    const bitmap = await createImageBitmap(new Blob([b64Bytes(result.image_png)], { type: "image/png" }));
    const width = bitmap.width;
    const height = bitmap.height;
    const image = el("canvas", { width, height });
    const ictx = image.getContext("2d", { willReadFrequently: true });
    ictx.drawImage(bitmap, 0, 0);
    const base = ictx.getImageData(0, 0, width, height).data;
    const panels = result.explanations.map((exp) => {
      const layer = el("canvas", { width, height });
      return { exp, layer, indices: exp.mask ? maskIndices(exp.mask, width, height) : null, key: "" };
    });
    return { result, image, base, panels, width, height };
  }

  function blendPanel(entry, panel) {
    const key = `${ui.colormap.value}|${state.opacity}|${ui.fade.checked}`;
    if (panel.key === key || !panel.indices) return;
    const ctx = panel.layer.getContext("2d");
    const out = ctx.createImageData(entry.width, entry.height);
    blendPixels(entry.base, panel.indices, state.tables[ui.colormap.value], state.opacity, ui.fade.checked, out.data);
    ctx.putImageData(out, 0, 0);
    panel.key = key;
  }

  function drawColorbar() {
    const table = state.tables[ui.colormap.value];
    if (!table) return;
    const ctx = ui.colorbar.getContext("2d");
    const row = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) row.data.set([table[3 * i], table[3 * i + 1], table[3 * i + 2], 255], 4 * i);
    ctx.putImageData(row, 0, 0);
    ui.colorbar.dataset.colormap = ui.colormap.value;
    ui.colorbar.setAttribute("aria-label",
      `Colour bar of ${ui.colormap.value}: left end is 0, the lowest value of each map; right end is 1, its highest`);
  }

  // ---------------------------------------------------------------- showing a result

  async function show(index) {
    const results = state.response.results;
    state.current = index;
    const result = results[index];
    const run = state.run;
    const response = state.response;
    if (!prepared.has(index)) prepared.set(index, prepare(result));
    let entry;
    try {
      entry = await prepared.get(index);
    } catch (err) {
      prepared.delete(index);
      showError(new Error(`The browser could not draw the maps of this image: ${err.message || err}`));
      return;
    }
    if (run !== state.run || state.current !== index || response !== state.response) return;
    const sameImage = state.entry && state.entry.result.image.index === result.image.index &&
      state.entry.result.image.frame === result.image.frame && state.entry.width === entry.width;
    state.entry = entry;
    if (!sameImage) state.view = { zoom: 1, cx: 0.5, cy: 0.5 };
    ui.result.hidden = false;
    renderTitle(results, result);
    renderTimings();
    renderWarnings(result);
    renderWindow(result);
    renderDicomReport(result);
    renderPredictions(result);
    renderPanels(entry);
    updateZoomLabel();
  }

  function renderTitle(results, result) {
    const { index, frame, filename, width, height } = result.image;
    const frames = results.filter((r) => r.image.index === index).length;
    const count = state.shown.pacs ? new Set(results.map((r) => r.image.index)).size : state.shown.files.length;
    let title = `Image ${index + 1} of ${count} · ${filename || "unnamed"}`;
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

  function renderWarnings(result) {
    const warnings = result.warnings || [];
    ui.warnings.hidden = !warnings.length;
    ui.warnings.replaceChildren(...(warnings.length
      ? [el("strong", { textContent: "Outside what the model knows" }),
        ...warnings.map((w) => el("p", { textContent: w }))]
      : []));
  }

  function windowText(image) {
    const w = image.window;
    if (!w) return "";
    const unit = image.modality === "CT" ? " HU" : "";
    const source = { request: "as chosen", file: "the file's own", range: "the image's full range of values" }[w.source] || "";
    return `Window: centre ${+w.centre.toFixed(1)}${unit}, width ${+w.width.toFixed(1)}${unit}` + (source ? ` (${source})` : "");
  }

  function renderWindow(result) {
    const text = windowText(result.image);
    ui.windowInfo.hidden = !text;
    ui.windowInfo.textContent = text;
  }

  const pct = (x) => `${(x * 100).toFixed(1)}%`;

  // ---------------------------------------------------------------- DICOM results

  function dicomObjects(fileIndex, test = () => true) {
    return (state.response.dicom || []).filter((obj) => obj.file_index === fileIndex && test(obj));
  }

  function dicomName(obj) {
    return obj.kind === "structured_report"
      ? `structured_report-${obj.file_index}.dcm`
      : `${obj.kind}-${obj.file_index}-${obj.method}-${obj.class_idx}.dcm`;
  }

  function saveDicom(objects) {
    for (const obj of objects) save(new Blob([b64Bytes(obj.data)], { type: "application/dicom" }), dicomName(obj));
  }

  // The file's report (one per file, whatever frame is shown), beside the image's title.
  function renderDicomReport(result) {
    const reports = dicomObjects(result.image.index, (obj) => obj.kind === "structured_report");
    ui.dicomReport.hidden = !reports.length;
    ui.dicomReport.replaceChildren(...(reports.length
      ? [actionButton("Download DICOM report", `Download the DICOM structured report of ${result.image.filename || "this file"}`,
        () => saveDicom(reports)),
      el("span", { className: "hint", textContent: "TID 1500 structured report: the predictions and the maps, for a PACS" })]
      : []));
  }

  function renderPredictions(result) {
    const explained = new Set(result.explanations.map((e) => e.class_idx));
    ui.predictions.replaceChildren(...result.predictions.map((p) => {
      const bar = el("div", { className: "bar" }, el("span"));
      bar.firstChild.style.width = pct(p.score);
      const button = el("button", { type: "button", className: "link", textContent: "Explain" });
      button.setAttribute("aria-label", `Explain class ${p.label} (${p.class_idx})`);
      button.addEventListener("click", () => {
        ui.classIdx.value = String(p.class_idx);
        rerun();
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

  function actionButton(text, label, onClick) {
    const button = el("button", { type: "button", className: "secondary", textContent: text });
    button.setAttribute("aria-label", label);
    button.addEventListener("click", onClick);
    return button;
  }

  function viewCanvas(entry, label) {
    const canvas = el("canvas", { tabIndex: 0 });
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-describedby", "view-help");
    canvas.setAttribute("aria-label", label);
    canvas.style.aspectRatio = `${entry.width} / ${entry.height}`;
    canvas.style.maxHeight = "55vh";
    attachViewControls(canvas);
    return canvas;
  }

  function renderPanels(entry) {
    const filename = entry.result.image.filename || "image";
    const figures = [];
    entry.views = [];
    if (ui.showOriginal.checked) {
      const original = { original: true, canvas: viewCanvas(entry, `${filename} as the service displayed it, without a map`) };
      const figure = el("figure", { className: "panel original" },
        el("figcaption", {}, el("span", { className: "title", textContent: "Original" }),
          el("span", { className: "meta", textContent: "as the service displayed it (windowed), no map" })),
        original.canvas);
      figure.dataset.method = "original";
      entry.views.push(original);
      figures.push(figure);
    }
    entry.panels.forEach((panel, i) => {
      const { exp } = panel;
      const title = methodTitle(exp.method);
      panel.canvas = viewCanvas(entry, `${title} map for ${exp.label} (class ${exp.class_idx}) over ${filename}`);
      const caption = el("figcaption", {},
        el("span", { className: "title", textContent: title }),
        el("span", { className: "meta", textContent: `${exp.label} (${exp.class_idx}) · ${pct(exp.score)} · layer ${exp.target_layer}` }));
      const figure = el("figure", { className: "panel" }, caption, panel.canvas);
      figure.dataset.method = exp.method;
      figure.dataset.classIdx = String(exp.class_idx);
      figure.dataset.index = String(i);
      const actions = el("div", { className: "actions" },
        actionButton("Download report", `Download a report of the ${title} map for ${exp.label} as PNG`,
          () => downloadReport(entry, panel)),
        actionButton("Download overlay", `Download the ${title} overlay for ${exp.label} as PNG`,
          () => downloadOverlay(entry, panel)),
        actionButton("Download JSON", `Download the ${title} result and mask for ${exp.label} as JSON`,
          () => downloadJson(entry, panel)));
      // The map as DICOM: a parametric map (or, for a source without geometry, a secondary
      // capture), one object for every frame of the file.
      const objects = dicomObjects(entry.result.image.index, (obj) => obj.kind !== "structured_report" &&
        obj.method === exp.method && obj.class_idx === exp.class_idx);
      if (objects.length) {
        const what = objects.map((obj) => obj.kind.replace("_", " ")).join(" and ");
        actions.append(actionButton("Download DICOM", `Download the ${title} map for ${exp.label} as a DICOM ${what}`,
          () => saveDicom(objects)));
      }
      figure.append(actions);
      entry.views.push(panel);
      figures.push(figure);
    });
    ui.panels.replaceChildren(...figures);
    resizeObserver.disconnect();
    for (const view of entry.views) resizeObserver.observe(view.canvas);
    drawAll();
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

  function compose(ctx, entry, view, width = entry.width, height = entry.height) {
    if (view.original) {
      ctx.drawImage(entry.image, 0, 0, width, height);
      return;
    }
    blendPanel(entry, view);
    ctx.drawImage(view.indices ? view.layer : entry.image, 0, 0, width, height);
  }

  function draw(view) {
    const entry = state.entry;
    const canvas = view.canvas;
    if (!entry || !canvas || !canvas.isConnected) return;
    const dpr = window.devicePixelRatio || 1;
    const g = geometry(canvas, entry);
    const w = Math.max(1, Math.round(g.cssW * dpr));
    const h = Math.max(1, Math.round(g.cssH * dpr));
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.setTransform(g.scale * dpr, 0, 0, g.scale * dpr, g.tx * dpr, g.ty * dpr);
    // Zoomed in past 2 screen pixels per image pixel, show pixels as blocks: that is what
    // inspecting detail means. Fitted, a small image is smoothed like any picture.
    ctx.imageSmoothingEnabled = state.view.zoom === 1 || g.scale * dpr < 2;
    compose(ctx, entry, view);
    canvas.dataset.opacity = view.original ? "original" : String(state.opacity);
    canvas.dataset.colormap = ui.colormap.value;
    canvas.dataset.drawn = String(Number(canvas.dataset.drawn || 0) + 1);
  }

  function drawAll() {
    if (state.entry && state.entry.views) for (const view of state.entry.views) draw(view);
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

  // ---------------------------------------------------------------- export

  function stemOf(entry, panel, kind) {
    const { exp } = panel;
    const stem = (entry.result.image.filename || "image").replace(/\.[^.]+$/, "");
    const frame = entry.result.image.frame ? `_frame${entry.result.image.frame}` : "";
    return `${stem}${frame}_${exp.method}_${exp.class_idx}_${kind}`;
  }

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function downloadOverlay(entry, panel) {
    // The blend as shown (colour map, opacity, fade), at the displayed image's own size.
    const canvas = el("canvas", { width: entry.width, height: entry.height });
    compose(canvas.getContext("2d"), entry, panel);
    canvas.toBlob((blob) => save(blob, `${stemOf(entry, panel, "overlay")}.png`), "image/png");
  }

  function viewSettings() {
    return { colormap: ui.colormap.value, opacity: state.opacity, fade_low_values: ui.fade.checked };
  }

  function reportLines(entry, panel) {
    const { exp } = panel;
    const { model } = state.response;
    const image = entry.result.image;
    const view = viewSettings();
    const lines = [
      [`${methodTitle(exp.method)} (${exp.method}) · layer ${exp.target_layer}`, "bold"],
      [`Class ${exp.label} (${exp.class_idx}) · score ${pct(exp.score)}`, "bold"],
      [`Model ${model.name} · version ${model.version}`, ""],
      [`Image ${image.filename || "unnamed"}${image.frame ? ` frame ${image.frame + 1}` : ""} · ${image.width}×${image.height}` +
        (image.modality ? ` · ${image.modality}` : ""), ""],
    ];
    const w = windowText(image);
    if (w) lines.push([w, ""]);
    lines.push([`Colour map ${view.colormap} · opacity ${Math.round(view.opacity * 100)}%` +
      (view.fade_low_values ? " · low values faded" : ""), ""]);
    lines.push(["Each map is scaled to its own minimum (0) and maximum (1).", ""]);
    for (const warning of entry.result.warnings || []) lines.push([`Warning: ${warning}`, "warn"]);
    lines.push([`camserve · request ${state.response.request_id} · ${new Date().toISOString()}`, "small"]);
    return lines;
  }

  function wrap(ctx, text, width) {
    const words = text.split(" ");
    const out = [];
    let line = "";
    for (const word of words) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > width) { out.push(line); line = word; } else line = next;
    }
    if (line) out.push(line);
    return out;
  }

  // A report: the overlay as shown, and below it a margin with the colour bar and what the map
  // is (method, class and score, layer, model and version, window, warnings).
  function reportCanvas(entry, panel) {
    const longest = Math.max(entry.width, entry.height);
    const scale = longest < REPORT_MIN_SIDE ? Math.ceil(REPORT_MIN_SIDE / longest) : 1;
    const iw = entry.width * scale;
    const ih = entry.height * scale;
    const width = Math.max(iw, 720);
    const pad = 16;
    const font = "14px system-ui, sans-serif";
    const measure = el("canvas", { width: 1, height: 1 }).getContext("2d");
    measure.font = font;
    const lines = reportLines(entry, panel).flatMap(([text, kind]) =>
      wrap(measure, text, width - 2 * pad).map((part) => [part, kind]));
    const margin = pad + 16 + 22 + 10 + lines.length * 20 + pad;
    const canvas = el("canvas", { width, height: ih + margin });
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#15171a";
    ctx.fillRect(0, 0, width, ih);
    ctx.imageSmoothingEnabled = scale === 1;  // small images are enlarged as blocks, not blurred
    compose(ctx, entry, panel, iw, ih);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    // compose drew at the origin: move it to the centre when the report is wider.
    if (width > iw) {
      const copy = ctx.getImageData(0, 0, iw, ih);
      ctx.fillStyle = "#15171a";
      ctx.fillRect(0, 0, width, ih);
      ctx.putImageData(copy, Math.floor((width - iw) / 2), 0);
    }
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, ih, width, margin);
    let y = ih + pad;
    const barWidth = width - 2 * pad;
    const table = state.tables[ui.colormap.value];
    for (let x = 0; x < barWidth; x++) {
      const i = Math.round((x / (barWidth - 1)) * 255);
      ctx.fillStyle = `rgb(${table[3 * i]}, ${table[3 * i + 1]}, ${table[3 * i + 2]})`;
      ctx.fillRect(pad + x, y, 1, 16);
    }
    ctx.strokeStyle = "#5b6470";
    ctx.strokeRect(pad - 0.5, y - 0.5, barWidth + 1, 17);
    y += 16 + 16;
    ctx.fillStyle = "#1b1f24";
    ctx.font = font;
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText("0 · lowest value of this map", pad, y);
    ctx.textAlign = "right";
    ctx.fillText("1 · highest value of this map", width - pad, y);
    ctx.textAlign = "left";
    y += 10;
    for (const [text, kind] of lines) {
      y += 20;
      ctx.font = kind === "bold" ? `bold ${font}` : kind === "small" ? "12px system-ui, sans-serif" : font;
      ctx.fillStyle = kind === "warn" ? "#b71c1c" : kind === "small" ? "#5b6470" : "#1b1f24";
      ctx.fillText(text, pad, y);
    }
    return canvas;
  }

  function downloadReport(entry, panel) {
    reportCanvas(entry, panel).toBlob((blob) => save(blob, `${stemOf(entry, panel, "report")}.png`), "image/png");
  }

  function downloadJson(entry, panel) {
    const { result } = entry;
    const document_ = {
      generated_by: "camserve review page",
      created_at: new Date().toISOString(),
      request_id: state.response.request_id,
      model: state.response.model,
      image: result.image,
      warnings: result.warnings || [],
      predictions: result.predictions,
      // The map as the service sent it: base64 little-endian float32, row-major, in [0, 1].
      explanation: panel.exp,
      view: { ...viewSettings(), window: result.image.window || null,
        note: "each map is scaled to its own minimum (0) and maximum (1)" },
    };
    const blob = new Blob([JSON.stringify(document_, null, 1)], { type: "application/json" });
    save(blob, `${stemOf(entry, panel, "result")}.json`);
  }

  // ---------------------------------------------------------------- wiring

  ui.form.addEventListener("submit", (event) => { event.preventDefault(); explain(); });
  ui.tabUpload.addEventListener("click", () => selectSource("upload"));
  ui.tabPacs.addEventListener("click", () => { selectSource("pacs"); ui.studyUid.focus(); });
  ui.tabs.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
    const next = state.source === "pacs" ? "upload" : "pacs";
    selectSource(next);
    (next === "pacs" ? ui.tabPacs : ui.tabUpload).focus();
  });
  [ui.studyUid, ui.seriesUid].forEach((input) => input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); explain(); }
  }));
  ui.file.addEventListener("change", () => setFiles(ui.file.files));
  ui.pacsSearch.addEventListener("click", () => searchStudies());
  ui.pacsMore.addEventListener("click", () => searchStudies(true));
  // Enter in a search field searches (the form's own submit would explain).
  ui.pacsSearchFields.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target instanceof HTMLInputElement) { event.preventDefault(); searchStudies(); }
  });
  ui.pacsPrev.addEventListener("click", () => showStep(browse.at - 1));
  ui.pacsNext.addEventListener("click", () => showStep(browse.at + 1));
  ui.pacsViewer.addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: browse.at - 1, ArrowRight: browse.at + 1, Home: 0, End: stepCount() - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    showStep(moves[event.key]);
  });
  ui.pacsImage.addEventListener("load", () => { ui.pacsImage.dataset.shown = ui.pacsImage.dataset.pending; });
  ui.pacsExplainImage.addEventListener("click", () => explainShown(false));
  ui.pacsExplainSeries.addEventListener("click", () => explainShown(true));
  ui.pacsStore.addEventListener("click", () => storeShown());

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
    drawAll();  // no request: the blend is redone from the masks already here
  });
  ui.fade.addEventListener("change", drawAll);
  ui.colormap.addEventListener("change", () => { drawColorbar(); drawAll(); });
  ui.showOriginal.addEventListener("change", () => { if (state.entry) renderPanels(state.entry); });
  ui.windowPreset.addEventListener("change", () => {
    const custom = ui.windowPreset.value === "custom";
    ui.windowCustom.hidden = !custom;
    if (custom) {
      const w = state.entry && state.entry.result.image.window;
      if (w && !ui.windowCentre.value) {
        ui.windowCentre.value = String(+w.centre.toFixed(1));
        ui.windowWidth.value = String(+w.width.toFixed(1));
      }
      ui.windowCentre.focus();
    } else if (state.selection) {
      explain();
    }
  });
  ui.windowApply.addEventListener("click", () => explain());
  [ui.windowCentre, ui.windowWidth].forEach((input) => input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); explain(); }
  }));
  ui.model.addEventListener("change", async () => {
    ui.layer.value = "";
    await loadLayers();
    if (state.response) setStatus("Model changed: press Explain to run it.");
  });
  ui.classClear.addEventListener("click", () => {
    ui.classIdx.value = "";
    if (state.response) rerun();
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
