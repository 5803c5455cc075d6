// xaiserve viewer: the page's logic. Plain ES2020, no build step; marked (markdown) and DOMPurify
// (sanitising the rendered cards) are vendored under static/vendor/. Everything the page shows comes
// from the JSON API under api/ (xaiserve/service/web/api.py): the protobuf JSON mapping of the
// explain.v1 messages, tensors as {dtype, shape, data: base64 little-endian}.
"use strict";
(() => {
  // ------------------------------------------------------------------------------- small helpers
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const clamp01 = (v) => (v < 0 ? 0 : v > 1 ? 1 : v);
  const fmt = (v, d = 3) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(d) : String(v));

  /** el("div.card", {title: "x"}, child, "text", ...): a DOM element; text is never parsed as HTML. */
  function el(spec, attrs, ...children) {
    const [tag, ...classes] = spec.split(".");
    const node = document.createElement(tag || "div");
    if (classes.length) node.className = classes.join(" ");
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const state = {
    token: sessionStorage.getItem("xaiserve.token") || "",
    methods: null, // GET api/methods
    models: [], // ListModelsResponse.models
    image: null, // {name, b64, size}
    previews: new Map(), // model id -> {bitmap, width, height, channels} of state.image
    explain: [], // result cards of the last explanation
    jobs: new Map(), // id -> job record (this page's jobs)
    current: null, // id of the job in the job panel
    path: null, // the ablation path shown
    denoise: null, // {particles, denoised, page}
  };

  // ------------------------------------------------------------------------------------- the API
  class ApiError extends Error {
    constructor(code, message, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.token) h.Authorization = "Bearer " + state.token;
    return h;
  }

  async function failure(r) {
    const text = await r.text();
    let doc = null;
    try {
      doc = text ? JSON.parse(text) : null;
    } catch (_) {
      doc = null;
    }
    const e = new ApiError((doc && doc.code) || "HTTP_" + r.status, (doc && doc.message) || text || r.statusText, r.status);
    if (r.status === 401) askForToken(e.message);
    return e;
  }

  async function api(path, body, method) {
    const init = { method: method || (body === undefined ? "GET" : "POST"), headers: headers() };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch("api/" + path, init);
    if (!r.ok) throw await failure(r);
    return r.json();
  }

  /** Server-sent events of a job, read with fetch (EventSource cannot send the Authorization header). */
  async function watchEvents(jobId, onEvent, signal) {
    const r = await fetch("api/jobs/" + encodeURIComponent(jobId) + "/events", {
      headers: headers({ Accept: "text/event-stream" }), signal,
    });
    if (!r.ok) throw await failure(r);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let scan = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n", scan)) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        scan = 0;
        let type = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const c = line.indexOf(":");
          const field = c < 0 ? line : line.slice(0, c);
          let v = c < 0 ? "" : line.slice(c + 1);
          if (v.startsWith(" ")) v = v.slice(1);
          if (field === "event") type = v;
          else if (field === "data") data.push(v);
        }
        if (data.length) onEvent(type, JSON.parse(data.join("\n")));
      }
      scan = Math.max(0, buf.length - 1);
    }
  }

  // ------------------------------------------------------------------------------------- tensors
  function b64ToBytes(b64) {
    const s = atob(b64 || "");
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function bytesToB64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  /** A Tensor message -> {shape, data} (float32 or uint8); null when the field is empty. */
  function tensor(t) {
    if (!t || !t.shape || !t.shape.length) return null;
    const shape = t.shape.map(Number);
    const bytes = b64ToBytes(t.data);
    if (t.dtype === "uint8") return { shape, data: bytes };
    if (t.dtype !== "float32") throw new Error("unexpected tensor dtype " + t.dtype);
    return { shape, data: new Float32Array(bytes.buffer, 0, bytes.byteLength / 4) };
  }

  /** Slice k of a [N, ...] tensor. */
  function slice(t, k) {
    const size = t.shape.slice(1).reduce((a, b) => a * b, 1);
    return { shape: t.shape.slice(1), data: t.data.subarray(k * size, (k + 1) * size) };
  }

  function range(data) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of data) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    return [lo, hi];
  }

  function percentiles(data, p0, p1) {
    const s = Float32Array.from(data).sort();
    return [s[Math.floor(p0 * (s.length - 1))], s[Math.floor(p1 * (s.length - 1))]];
  }

  // The server's colour map (service/images.py heat_colormap): blue (low) -> white -> red (high).
  const HEAT = (() => {
    const lut = new Uint8ClampedArray(256 * 3);
    for (let q = 0; q < 256; q++) {
      const v = q / 255;
      let rgb;
      if (v < 0.5) {
        const t = v * 2;
        rgb = [0.15 + 0.85 * t, 0.25 + 0.75 * t, 0.85 + 0.15 * t];
      } else {
        const t = v * 2 - 1;
        rgb = [1 - 0.15 * t, 1 - 0.9 * t, 1 - 0.9 * t];
      }
      for (let c = 0; c < 3; c++) lut[q * 3 + c] = Math.round(rgb[c] * 255);
    }
    return lut;
  })();

  function sized(canvas, w, h) {
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    return canvas.getContext("2d", { willReadFrequently: true });
  }

  /** A [H, W] map over `base` (an ImageBitmap, drawn scaled), blended like the server's overlay:
   * (1 - a) * image + a * heat(map). `lo`/`hi` map values to the colour range (default [0, 1]);
   * with `fadeZeros`, pixels whose value is exactly 0 show the image faded to grey (U-RELAX's
   * "too uncertain to say"). */
  function drawOverlay(canvas, base, map, opacity, lo = 0, hi = 1, fadeZeros = false) {
    const [H, W] = map.shape;
    const ctx = sized(canvas, W, H);
    ctx.imageSmoothingEnabled = true;
    if (base) ctx.drawImage(base, 0, 0, W, H);
    else {
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, W, H);
    }
    const img = ctx.getImageData(0, 0, W, H);
    const d = img.data;
    const a = base ? opacity : 1;
    const s = hi > lo ? 255 / (hi - lo) : 0;
    for (let i = 0; i < H * W; i++) {
      const o = i * 4;
      d[o + 3] = 255;
      if (fadeZeros && map.data[i] === 0) {
        const lum = base ? 0.299 * d[o] + 0.587 * d[o + 1] + 0.114 * d[o + 2] : 0;
        d[o] = d[o + 1] = d[o + 2] = 150 + 0.35 * lum;
        continue;
      }
      const q = Math.max(0, Math.min(255, Math.round((map.data[i] - lo) * s))) * 3;
      d[o] = (1 - a) * d[o] + a * HEAT[q];
      d[o + 1] = (1 - a) * d[o + 1] + a * HEAT[q + 1];
      d[o + 2] = (1 - a) * d[o + 2] + a * HEAT[q + 2];
    }
    ctx.putImageData(img, 0, 0);
  }

  /** A [H, W] map in grey, lo -> black, hi -> white (lo > hi inverts). */
  function drawGray(canvas, map, lo, hi) {
    const [H, W] = map.shape;
    const ctx = sized(canvas, W, H);
    const img = ctx.createImageData(W, H);
    const s = hi !== lo ? 255 / (hi - lo) : 0;
    for (let i = 0; i < H * W; i++) {
      const v = Math.max(0, Math.min(255, (map.data[i] - lo) * s));
      img.data.set([v, v, v, 255], i * 4);
    }
    ctx.putImageData(img, 0, 0);
  }

  /** A [H, W, C] image in [0, 1] (C = 1 or 3). */
  function drawRGB(canvas, im) {
    const [H, W, C] = im.shape;
    const ctx = sized(canvas, W, H);
    const img = ctx.createImageData(W, H);
    for (let i = 0; i < H * W; i++) {
      for (let c = 0; c < 3; c++) img.data[i * 4 + c] = Math.round(clamp01(im.data[i * C + (C === 1 ? 0 : c)]) * 255);
      img.data[i * 4 + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawBitmap(canvas, bitmap) {
    const ctx = sized(canvas, bitmap.width, bitmap.height);
    ctx.drawImage(bitmap, 0, 0);
  }

  async function pngBitmap(b64) {
    return createImageBitmap(new Blob([b64ToBytes(b64)], { type: "image/png" }));
  }

  // ------------------------------------------------------------------------------ notices, token
  let noticeTimer = null;
  $("#notice").addEventListener("click", () => ($("#notice").hidden = true));

  function notice(text, kind = "error") {
    const n = $("#notice");
    n.textContent = text;
    n.className = "notice " + kind;
    n.hidden = false;
    clearTimeout(noticeTimer);
    if (kind !== "error") noticeTimer = setTimeout(() => (n.hidden = true), 4000);
  }

  function describe(e) {
    return e instanceof ApiError ? `${e.code}: ${e.message}` : String(e && e.message ? e.message : e);
  }

  function askForToken(message) {
    $("#auth").classList.add("wanted");
    notice(message + " (enter the token above)");
    $("#token").focus();
  }

  $("#auth").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    state.token = $("#token").value.trim();
    if (state.token) sessionStorage.setItem("xaiserve.token", state.token);
    else sessionStorage.removeItem("xaiserve.token");
    $("#auth").classList.remove("wanted");
    $("#notice").hidden = true;
    await load();
    await restoreJobs();
  });

  // ---------------------------------------------------------------------------------------- tabs
  function showTab() {
    const name = (location.hash || "#models").slice(1);
    const known = $$("#tabs a").map((a) => a.dataset.tab);
    const tab = known.includes(name) ? name : "models";
    for (const a of $$("#tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
    for (const s of $$("section.tab")) s.hidden = s.id !== "tab-" + tab;
    document.body.dataset.tab = tab;
  }
  window.addEventListener("hashchange", showTab);

  // ------------------------------------------------------------------------------ models and methods
  const modelId = (m) => `${m.name}:${m.version}`;
  const available = (m) => m.available !== false;
  const methodSpec = (name) => (state.methods && state.methods.methods[name]) || { rpc: "", doc: "" };
  const fastMethods = (m) => (m.methods || []).filter((n) => methodSpec(n).rpc === "Explain");
  const findModel = (id) => state.models.find((m) => modelId(m) === id || m.name === id);

  function options(select, items, keep) {
    const old = keep ? select.value : "";
    select.replaceChildren(...items.map(([value, label]) => el("option", { value, text: label })));
    if (old && items.some(([v]) => v === old)) select.value = old;
  }

  async function load() {
    try {
      state.methods = await api("methods");
      state.models = (await api("models")).models;
    } catch (e) {
      $("#models-list").replaceChildren(el("p.error", { text: "Could not load the models: " + describe(e) }));
      return;
    }
    renderModels();
    const explainable = state.models.filter((m) => available(m) && fastMethods(m).length);
    // masking networks first: their own mask is the point of the Explain tab
    explainable.sort((a, b) => Number(methodSpec(fastMethods(b)[0]).own || false) - Number(methodSpec(fastMethods(a)[0]).own || false));
    options($("#explain-model"), explainable.map((m) => [modelId(m), `${modelId(m)} (${m.kind})`]), true);
    explainModelChanged();
    options($("#job-method"), Object.keys(state.methods.jobs).map((n) => [n, n]), true);
    jobMethodChanged();
    options($("#denoise-model"), state.models.filter((m) => available(m) && m.kind === "denoiser").map((m) => [modelId(m), modelId(m)]), true);
  }

  function renderModels() {
    const list = $("#models-list");
    list.replaceChildren(...state.models.map((m) => {
      const inp = m.input || {};
      const chips = (m.methods || []).map((n) => el("span.chip." + (methodSpec(n).rpc || "none").toLowerCase(), {
        title: `${methodSpec(n).rpc}: ${methodSpec(n).doc}`, text: n,
      }));
      let card = null;
      if (m.card) {
        card = el("details.card-md", {}, el("summary", { text: "Model card" }));
        const body = el("div.markdown");
        body.innerHTML = window.DOMPurify.sanitize(window.marked.parse(m.card), { USE_PROFILES: { html: true } });
        for (const a of $$("a", body)) {
          a.target = "_blank";
          a.rel = "noopener noreferrer";
        }
        card.append(body);
      }
      const dims = inp.height ? `${inp.height} × ${inp.width} × ${inp.channels}` : "?";
      return el("article.model" + (available(m) ? "" : ".unavailable"), { dataset: { model: modelId(m) } },
        el("header", {},
          el("h3", { text: modelId(m) }),
          el("span.badge.kind", { text: m.kind }),
          available(m) ? el("span.badge." + (m.loaded ? "ok" : "idle"), { text: m.loaded ? "loaded" : "not loaded" })
            : el("span.badge.bad", { text: "unavailable" })),
        m.description ? el("p.desc", { text: m.description }) : null,
        available(m) ? null : el("p.error", { text: m.unavailable_reason || "not served" }),
        el("dl", {},
          el("dt", { text: "input" }), el("dd", {}, dims,
            inp.mean && inp.mean.length ? el("span.dim", { text: `  mean ${inp.mean.map((v) => fmt(v, 3)).join(", ")}, std ${inp.std.map((v) => fmt(v, 3)).join(", ")}` }) : null),
          m.explains ? [el("dt", { text: "explains" }), el("dd", { text: m.explains })] : null,
          m.labels && m.labels.length ? [el("dt", { text: "labels" }), el("dd", { text: m.labels.join(", ") })] : null,
          m.output_dim ? [el("dt", { text: "output" }), el("dd", { text: `${m.output_dim} values` })] : null,
          el("dt", { text: "methods" }), el("dd.chips", {}, chips.length ? chips : "none")),
        available(m) ? el("div.actions", {}, ...modelActions(m)) : null,
        card);
    }));
  }

  /** Buttons that open the model in the tab that serves its methods. */
  function modelActions(m) {
    const id = modelId(m);
    const jobMethods = (m.methods || []).filter((n) => state.methods.jobs[n]);
    const go = (tab, sel, value, after) => () => {
      location.hash = "#" + tab;
      if (sel === "#job-method") {
        $(sel).value = value;
        jobMethodChanged();
        $("#job-model").value = id;
      } else {
        $(sel).value = value;
        if (after) after();
      }
    };
    return [
      fastMethods(m).length ? el("button", { text: "Explain", onclick: go("explain", "#explain-model", id, explainModelChanged) }) : null,
      ...jobMethods.map((n) => el("button", { text: `${n} job`, onclick: go("jobs", "#job-method", n) })),
      m.kind === "denoiser" ? el("button", { text: "Denoise", onclick: go("denoise", "#denoise-model", id) }) : null,
    ];
  }

  // ------------------------------------------------------------------------------------- images
  /** Every drop zone and file input loads the one current image, shared by Explain and Jobs. */
  function bindImageInputs() {
    for (const zone of $$("[data-image-input]")) {
      const input = $("input[type=file]", zone);
      $("[data-pick]", zone).addEventListener("click", () => input.click());
      input.addEventListener("change", () => input.files[0] && loadImageFile(input.files[0]));
      zone.addEventListener("dragover", (ev) => {
        ev.preventDefault();
        zone.classList.add("over");
      });
      zone.addEventListener("dragleave", () => zone.classList.remove("over"));
      zone.addEventListener("drop", (ev) => {
        ev.preventDefault();
        zone.classList.remove("over");
        const f = ev.dataTransfer.files[0];
        if (f) loadImageFile(f);
      });
      for (const b of $$("[data-sample]", zone)) b.addEventListener("click", () => loadSample(b.dataset.sample));
    }
  }

  async function loadImageFile(file) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    setImage(file.name, bytes);
  }

  async function loadSample(name) {
    const r = await fetch("static/samples/" + name);
    if (!r.ok) return notice(`sample ${name}: HTTP ${r.status}`);
    setImage(name, new Uint8Array(await r.arrayBuffer()));
  }

  function setImage(name, bytes) {
    state.image = { name, b64: bytesToB64(bytes), size: bytes.length };
    state.previews.clear();
    for (const p of $$("[data-filename]")) p.textContent = `${name} (${(bytes.length / 1024).toFixed(1)} KiB)`;
    state.explain = [];
    $("#explain-results").replaceChildren();
    showExplainInput();
  }

  /** The image as the server decodes it for `model` (DICOM windowed, EXIF ignored), cached per model. */
  async function preview(model) {
    if (!state.image) throw new Error("load an image first");
    if (!state.previews.has(model)) {
      const p = api("preview", { model, image: { encoded: state.image.b64 } }).then(async (doc) => ({
        bitmap: await pngBitmap(doc.png), width: doc.width, height: doc.height, channels: doc.channels,
      }));
      state.previews.set(model, p);
      p.catch(() => state.previews.delete(model));
    }
    return state.previews.get(model);
  }

  // ------------------------------------------------------------------------------------- Explain
  function explainModel() {
    return findModel($("#explain-model").value);
  }

  function explainModelChanged() {
    const m = explainModel();
    const box = $("#explain-target-box");
    const targeted = m && (m.kind === "nemt" || m.kind === "classifier") && (m.labels || []).length;
    box.hidden = !targeted;
    if (targeted) {
      options($("#explain-target"), [["", "argmax (the model's choice)"], ...m.labels.map((l, i) => [String(i), `${i}: ${l}`])]);
    }
    state.explain = [];
    $("#explain-results").replaceChildren();
    showExplainInput();
  }

  async function showExplainInput() {
    const m = explainModel();
    const canvas = $("#explain-input");
    if (!state.image || !m) return;
    try {
      const p = await preview(modelId(m));
      drawBitmap(canvas, p.bitmap);
      $("#explain-input-caption").textContent = `${state.image.name}: ${p.height} × ${p.width}, as ${modelId(m)} reads it`;
    } catch (e) {
      $("#explain-input-caption").textContent = describe(e);
      notice(describe(e));
    }
  }

  async function runExplain() {
    const m = explainModel();
    if (!m) return notice("no model to explain with");
    if (!state.image) return notice("load an image first (drop one, choose a file or take a sample)");
    const status = $("#explain-status");
    const target = $("#explain-target-box").hidden ? "" : $("#explain-target").value;
    const methods = fastMethods(m);
    status.textContent = `running ${methods.length} methods…`;
    $("#explain-run").disabled = true;
    const results = $("#explain-results");
    state.explain = methods.map((method) => ({ method, figure: null, response: null, error: null }));
    results.replaceChildren(...state.explain.map((r) => {
      r.canvas = el("canvas.view", { width: 1, height: 1 });
      r.meta = el("div.meta", { text: "…" });
      r.figure = el("figure.result", { dataset: { method: r.method, state: "running" } },
        el("h3", { text: r.method, title: methodSpec(r.method).doc }), r.canvas, r.meta,
        el("p.doc", { text: methodSpec(r.method).doc }));
      return r.figure;
    }));
    const t0 = performance.now();
    let base = null;
    try {
      base = (await preview(modelId(m))).bitmap;
    } catch (e) {
      notice(describe(e));
    }
    // one method after the other: each timing is then that method's alone, not a share of the cores
    for (const r of state.explain) {
      const body = (fidelity) => ({
        model: modelId(m), image: { encoded: state.image.b64 },
        options: Object.assign({ method: r.method, fidelity }, target !== "" ? { target_label: Number(target) } : {}),
      });
      try {
        try {
          r.response = await api("explain", body(true));
        } catch (e) {
          // fidelity needs the frozen model's ONNX graph; explain without it when the store lacks it
          if (!(e instanceof ApiError && e.code === "FAILED_PRECONDITION" && /fidelity/.test(e.message))) throw e;
          r.response = await api("explain", body(false));
        }
        r.mask = tensor(r.response.mask);
        r.base = base;
        r.figure.dataset.state = "done";
      } catch (e) {
        r.error = describe(e);
        r.figure.dataset.state = "error";
      }
      renderExplainResult(r);
    }
    $("#explain-run").disabled = false;
    const failed = state.explain.filter((r) => r.error).length;
    status.textContent = `${methods.length - failed} of ${methods.length} methods in ${((performance.now() - t0) / 1000).toFixed(2)} s`
      + (failed ? `, ${failed} failed` : "");
  }

  function renderExplainResult(r) {
    if (r.error) {
      r.meta.replaceChildren(el("span.error", { text: r.error }));
      return;
    }
    const opacity = Number($("#explain-opacity").value);
    drawOverlay(r.canvas, r.base, r.mask, opacity);
    const res = r.response;
    const tm = res.timing || {};
    const m = explainModel();
    const bits = [`total ${fmt(tm.total_ms, 1)} ms`, `model ${fmt(tm.inference_ms, 1)} ms`];
    if (tm.batch_size > 1) bits.push(`batch ${tm.batch_size}`);
    const lines = [el("div", { text: bits.join(" · ") })];
    if (res.fidelity !== undefined) lines.push(el("div", {}, "fidelity ", el("b", { text: fmt(res.fidelity, 3) })));
    if (res.target_label >= 0) {
      const labels = (m && m.labels) || [];
      lines.push(el("div", { text: `label ${res.target_label}${labels[res.target_label] ? ": " + labels[res.target_label] : ""}` }));
    }
    r.meta.replaceChildren(...lines);
  }

  $("#explain-model").addEventListener("change", explainModelChanged);
  $("#explain-target").addEventListener("change", () => state.explain.length && runExplain());
  $("#explain-run").addEventListener("click", runExplain);
  $("#explain-opacity").addEventListener("input", () => {
    $("#explain-opacity-value").textContent = Number($("#explain-opacity").value).toFixed(2);
    for (const r of state.explain) if (r.mask) renderExplainResult(r);
  });

  // ---------------------------------------------------------------------------------------- Jobs
  function jobMethodChanged() {
    const method = $("#job-method").value;
    const models = state.models.filter((m) => available(m) && (m.methods || []).includes(method));
    options($("#job-model"), models.map((m) => [modelId(m), `${modelId(m)} (${m.kind})`]), true);
    const spec = state.methods.jobs[method];
    const box = $("#job-params");
    box.replaceChildren(el("legend", { text: "Parameters (empty = the default shown)" }));
    if (!spec) return;
    for (const f of spec.fields) {
      if (!["int", "float", "bool", "string"].includes(f.type)) continue;
      const id = `job-param-${f.name}`;
      let input;
      const def = f.default === null || f.default === undefined ? "" : f.default;
      if (f.type === "bool") {
        // the viewer wants the intervened images along the path, so it asks for them by default
        const on = f.name === "return_images" ? true : Boolean(def);
        input = el("input", { type: "checkbox", id, checked: on });
      } else if (f.choices.length) {
        input = el("select", { id }, el("option", { value: "", text: `default (${def})` }),
          ...f.choices.map((c) => el("option", { value: c, text: c })));
      } else if (f.type === "string") {
        input = el("input", { type: "text", id, placeholder: String(def) });
      } else {
        input = el("input", { type: "number", id, step: f.type === "int" ? "1" : "any", placeholder: def === "" ? (f.name === "target_label" ? "argmax" : "unset") : String(def) });
      }
      input.dataset.param = f.name;
      input.dataset.type = f.type;
      box.append(el("label.param", { title: f.help }, el("span.name", { text: f.name }), input,
        el("span.help", { text: f.help })));
    }
  }

  function jobParams() {
    const out = {};
    for (const input of $$("#job-params [data-param]")) {
      const name = input.dataset.param;
      const type = input.dataset.type;
      if (type === "bool") {
        if (input.checked) out[name] = true;
      } else if (input.value !== "") {
        out[name] = type === "int" || type === "float" ? Number(input.value) : input.value;
      }
    }
    return out;
  }

  async function submitJob(ev) {
    ev.preventDefault();
    const method = $("#job-method").value;
    const model = $("#job-model").value;
    const status = $("#job-form-status");
    if (!state.image) return notice("load an image first (drop one, choose a file or take a sample)");
    const body = { method, model, image: { encoded: state.image.b64 } };
    const key = state.methods.jobs[method].params;
    if (key) body[key] = jobParams();
    const deadline = $("#job-deadline").value;
    if (deadline !== "") body.deadline_seconds = Number(deadline);
    status.textContent = "submitting…";
    try {
      const job = await api("jobs", body);
      status.textContent = `submitted ${job.id}`;
      const rec = { id: job.id, job, method, model, image: state.image, progress: 0, message: "", heat: null };
      state.jobs.set(job.id, rec);
      saveJobs();
      preview(model).then((p) => (rec.base = p.bitmap), () => null);
      selectJob(job.id);
      watchJob(rec);
    } catch (e) {
      status.textContent = "";
      notice(describe(e));
    }
  }

  async function watchJob(rec) {
    rec.abort = new AbortController();
    let terminal = false;
    try {
      await watchEvents(rec.id, (type, ev) => {
        if (type === "error") {
          rec.message = `${ev.code}: ${ev.message}`;
          return;
        }
        if (ev.job && ev.job.id) rec.job = ev.job;
        else if (type === "EVENT_STARTED" || type === "EVENT_PROGRESS") rec.job.state = "RUNNING";
        rec.progress = ev.progress || rec.progress;
        if (ev.message) rec.message = ev.message;
        if (ev.partial_heatmap && ev.partial_heatmap.shape && ev.partial_heatmap.shape.length) rec.heat = tensor(ev.partial_heatmap);
        if (["EVENT_SUCCEEDED", "EVENT_FAILED", "EVENT_CANCELLED", "EVENT_EXPIRED"].includes(type)) {
          terminal = true;
          rec.progress = type === "EVENT_SUCCEEDED" ? 1 : rec.progress;
          if (type !== "EVENT_SUCCEEDED") rec.message = (ev.job && ev.job.error) || ev.message || type;
        }
        renderJobs();
      }, rec.abort.signal);
    } catch (e) {
      if (e.name !== "AbortError") rec.message = describe(e);
    }
    if (!terminal) {
      try {
        rec.job = await api(`jobs/${encodeURIComponent(rec.id)}?include_result=1`);
      } catch (e) {
        rec.message = describe(e);
      }
    }
    renderJobs();
  }

  async function cancelJob() {
    const rec = state.jobs.get(state.current);
    if (!rec) return;
    try {
      rec.job = Object.assign(rec.job, await api(`jobs/${encodeURIComponent(rec.id)}/cancel`, {}));
      renderJobs();
    } catch (e) {
      notice(describe(e));
    }
  }

  async function selectJob(id) {
    state.current = id;
    $("#job-result").replaceChildren();
    $("#job-live").replaceChildren();
    const rec = state.jobs.get(id);
    const res = rec && rec.job.result;
    if (rec && rec.job.state === "SUCCEEDED" && !(res && Object.keys(res).some((k) => k !== "timings" && k !== "parameters_json" && res[k] && typeof res[k] === "object" && Object.keys(res[k]).length))) {
      try {
        rec.job = await api(`jobs/${encodeURIComponent(id)}?include_result=1`);  // a job restored after a reload
      } catch (e) {
        rec.message = describe(e);
      }
    }
    renderJobs();
  }

  /** The page's jobs survive a reload of the page (ids in sessionStorage; the server keeps the jobs). */
  function saveJobs() {
    const list = Array.from(state.jobs.values()).map((r) => ({ id: r.id, method: r.method, model: r.model }));
    sessionStorage.setItem("xaiserve.jobs", JSON.stringify(list));
  }

  async function restoreJobs() {
    let saved = [];
    try {
      saved = JSON.parse(sessionStorage.getItem("xaiserve.jobs") || "[]");
    } catch (_) {
      saved = [];
    }
    for (const s of saved) {
      if (state.jobs.has(s.id)) continue;
      try {
        const job = await api(`jobs/${encodeURIComponent(s.id)}`);
        const rec = { id: s.id, job, method: s.method, model: s.model, progress: job.progress, message: job.error || "", heat: null };
        state.jobs.set(s.id, rec);
        if (!TERMINAL.includes(job.state)) watchJob(rec);
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 404)) return; // no token yet, or the server is away: keep the list
        // 404: purged, or another token's job: forget it
      }
    }
    saveJobs();
    renderJobs();
  }

  const TERMINAL = ["SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"];

  function renderJobs() {
    const tbody = $("#jobs-table tbody");
    tbody.replaceChildren(...Array.from(state.jobs.values()).reverse().map((rec) => el("tr", { dataset: { job: rec.id, state: rec.job.state } },
      el("td.mono", { text: rec.id }), el("td", { text: rec.method }), el("td", { text: rec.model }),
      el("td", {}, el("span.badge.state-" + String(rec.job.state).toLowerCase(), { text: rec.job.state })),
      el("td", { text: `${Math.round((rec.progress || 0) * 100)} %` }),
      el("td", {}, el("button", { text: "view", onclick: () => selectJob(rec.id) }),
        rec.method === "ablation_path" && rec.job.state === "SUCCEEDED" ? el("button", { text: "path", onclick: () => openPath(rec) }) : null))));
    options($("#path-job"), Array.from(state.jobs.values()).filter((r) => r.method === "ablation_path" && r.job.state === "SUCCEEDED")
      .map((r) => [r.id, `${r.id} (${r.model})`]), true);
    const rec = state.jobs.get(state.current);
    if (!rec) return;
    $("#job-id").textContent = rec.id;
    const st = rec.job.state;
    $("#job-state").textContent = st;
    $("#job-state").className = "badge state-" + String(st).toLowerCase();
    $("#job-panel").dataset.state = st;
    $("#job-message").textContent = rec.message || "";
    $("#job-progress").style.width = `${Math.round((rec.progress || 0) * 100)}%`;
    $("#job-cancel").disabled = TERMINAL.includes(st);
    $("#job-open-path").hidden = !(rec.method === "ablation_path" && st === "SUCCEEDED");
    if (rec.heat && !TERMINAL.includes(st)) {
      let c = $("#job-live canvas");
      if (!c) {
        c = el("canvas.view", { id: "live-heat", width: 1, height: 1 });
        $("#job-live").replaceChildren(el("figure", {}, c, el("figcaption", { text: "partial heatmap (the estimate so far)" })));
      }
      const [lo, hi] = range(rec.heat.data);
      drawOverlay(c, rec.base, rec.heat, 0.6, lo, hi);
    } else if (TERMINAL.includes(st)) {
      $("#job-live").replaceChildren();
    }
    if (st === "SUCCEEDED" && rec.job.result && !$("#job-result").childElementCount) renderJobResult(rec);
    $("#job-details").textContent = TERMINAL.includes(st) && rec.job.result ? jobDetails(rec.job) : "";
  }

  function jobDetails(job) {
    const r = job.result || {};
    const timings = Object.entries(r.timings || {}).map(([k, v]) => `${k} ${fmt(v, 2)} s`).join(", ");
    let params = r.parameters_json || "";
    try {
      params = JSON.stringify(JSON.parse(params));
    } catch (_) { /* shown as sent */ }
    return `timings: ${timings}\nparameters: ${params}`;
  }

  function figure(canvas, caption) {
    return el("figure", {}, canvas, el("figcaption", { text: caption }));
  }

  function renderJobResult(rec) {
    const res = rec.job.result;
    const out = $("#job-result");
    if (res.relax) {
      const rx = res.relax;
      const imp = tensor(rx.importance);
      const unc = tensor(rx.uncertainty);
      const ur = tensor(rx.u_relax);
      const [lo, hi] = range(imp.data);
      const [ulo, uhi] = range(unc.data);
      const c1 = el("canvas.view", { dataset: { map: "importance" } });
      const c2 = el("canvas.view", { dataset: { map: "uncertainty" } });
      const c3 = el("canvas.view", { dataset: { map: "u_relax" } });
      drawOverlay(c1, rec.base, imp, 0.75, lo, hi);
      drawOverlay(c2, null, unc, 1, ulo, uhi);
      drawOverlay(c3, rec.base, ur, 0.75, lo, hi, true);
      out.replaceChildren(
        figure(c1, `importance R [${fmt(lo, 3)}, ${fmt(hi, 3)}]`),
        figure(c2, `uncertainty U [${fmt(ulo, 4)}, ${fmt(uhi, 4)}]`),
        figure(c3, `U-RELAX: R where U < ε = ${fmt(rx.threshold, 4)}, grey where too uncertain`),
        el("p.meta", { text: `${rx.num_masks} masks · max standard error ${fmt(rx.achieved_error, 4)} · ${fmt(rx.masks_per_second, 0)} masks/s` }));
    } else if (res.ablation) {
      const ab = res.ablation;
      const heat = tensor(ab.heatmap);
      const [lo, hi] = range(heat.data);
      const c = el("canvas.view", { dataset: { map: "heatmap" } });
      drawOverlay(c, rec.base, heat, 0.6, lo, hi);
      const strip = el("img.strip", { alt: "the path, slice by slice, with F(t)" });
      strip.src = URL.createObjectURL(new Blob([b64ToBytes(ab.strip_png)], { type: "image/png" }));
      out.replaceChildren(figure(c, "heatmap of the path"),
        el("p.meta", { text: `target ${ab.target_label} · score ${fmt(ab.score, 3)} · ${ab.iterations} iterations · stopped by ${ab.stop_reason}` }),
        el("figure.wide", {}, strip, el("figcaption", { text: "the server's rendering of the path (phi(t) and F(t) under each slice)" })));
    } else {
      // another job method: its PNG renderings, whatever its result message holds
      const kind = Object.keys(res).find((k) => res[k] && typeof res[k] === "object" && !["timings"].includes(k));
      const body = kind ? res[kind] : {};
      const pngs = Object.entries(body).filter(([k, v]) => /png$/.test(k) && v);
      out.replaceChildren(...pngs.map(([k, v]) => {
        const img = el("img.strip", { alt: k });
        img.src = URL.createObjectURL(new Blob([b64ToBytes(v)], { type: "image/png" }));
        return el("figure.wide", {}, img, el("figcaption", { text: `${kind}.${k}` }));
      }), pngs.length ? null : el("p.meta", { text: `result: ${kind || "(empty)"}; see the details below` }));
    }
  }

  $("#job-method").addEventListener("change", jobMethodChanged);
  $("#job-form").addEventListener("submit", submitJob);
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-open-path").addEventListener("click", () => openPath(state.jobs.get(state.current)));

  // ------------------------------------------------------------------------------- Ablation path
  function openPath(rec) {
    location.hash = "#path";
    $("#path-job").value = rec.id;
    showPath(rec.job, rec.base);
  }

  async function loadPath() {
    const id = $("#path-job-id").value.trim() || $("#path-job").value;
    if (!id) return notice("choose a finished ablation-path job or enter its id");
    $("#path-status").textContent = "loading…";
    try {
      let job = await api(`jobs/${encodeURIComponent(id)}?include_result=1`);
      if (job.method === "ablation_path" && !TERMINAL.includes(job.state)) {
        // not finished yet: follow its events and show the path when it ends
        $("#path-status").textContent = `job ${id} is ${job.state}: waiting for it to finish…`;
        await watchEvents(id, (type, ev) => {
          if (ev.job && ev.job.id && TERMINAL.includes(ev.job.state)) job = ev.job;
          else $("#path-status").textContent = `job ${id} is running: ${Math.round((ev.progress || 0) * 100)} %, ${ev.message || ""}`;
        });
      }
      if (job.state !== "SUCCEEDED" || !job.result || !job.result.ablation) {
        $("#path-status").textContent = "";
        return notice(`job ${id} is ${job.state}${job.result && job.result.relax ? " (a RELAX job)" : ""}: only a finished ablation-path job has a path`);
      }
      const rec = state.jobs.get(id);
      showPath(job, rec ? rec.base : null);
    } catch (e) {
      $("#path-status").textContent = "";
      notice(describe(e));
    }
  }

  function showPath(job, base) {
    stopPlaying();
    const ab = job.result.ablation;
    const p = {
      job, base,
      path: tensor(ab.path), times: tensor(ab.times), probs: tensor(ab.probabilities), heat: tensor(ab.heatmap),
      images: tensor(ab.images), down: tensor(ab.path_down), target: ab.target_label,
    };
    const [T, H, W] = p.path.shape;
    p.T = T;
    p.H = H;
    p.W = W;
    const K = p.probs.shape[1];
    p.F = Array.from({ length: T + 2 }, (_, k) => p.probs.data[k * K + p.target]);
    state.path = p;
    const slider = $("#path-slider");
    slider.max = String(T + 1);
    slider.value = "0";
    $("#path-view").hidden = false;
    $("#path-down-figure").hidden = !p.down;
    const model = findModel(job.model);
    const label = model && model.labels && model.labels[p.target] ? `${p.target}: ${model.labels[p.target]}` : String(p.target);
    $("#path-curve-caption").textContent = `F(t): probability of the target (${label}); ● the t shown`;
    $("#path-image-caption").textContent = p.images ? "intervened image at t" : "intervened image at t (submit with return_images to see it)";
    $("#path-status").textContent = `${job.id}: ${T} interior slices, score ${fmt(ab.score, 3)}, stopped by ${ab.stop_reason}`;
    $("#path-details").textContent = jobDetails(job);
    renderPathStatic();
    renderSlice();
  }

  /** φ at slice k: 0 at t = 0, 1 at t = 1, the path's slices between. */
  function phiAt(path, k, T, H, W) {
    if (k === 0) return { shape: [H, W], data: new Float32Array(H * W) };
    if (k === T + 1) return { shape: [H, W], data: new Float32Array(H * W).fill(1) };
    return slice(path, k - 1);
  }

  /** φ drawn as the server's strip draws it (service/render/ablation.py): white where the image is
   * kept (φ = 0), black where the baseline replaced it (φ = 1). */
  function drawPhi(canvas, phi) {
    const [lo, hi] = range(phi.data);
    if ($("#path-stretch").checked && hi - lo > 1e-6) drawGray(canvas, phi, hi, lo);
    else drawGray(canvas, phi, 1, 0);
    return [lo, hi];
  }

  function renderPathStatic() {
    const p = state.path;
    const [lo, hi] = range(p.heat.data);
    const base = p.images ? imageBitmapOf(slice(p.images, 0)) : p.base;
    Promise.resolve(base).then((b) => {
      drawOverlay($("#path-heatmap"), b, p.heat, Number($("#path-opacity").value), lo, hi);
    });
    const params = (() => {
      try {
        return JSON.parse(p.job.result.parameters_json || "{}");
      } catch (_) {
        return {};
      }
    })();
    $("#path-heatmap-caption").textContent = `heatmap, reduction "${params.reduction || "transition"}" of the ${params.score || "retaining"} path`;
    drawCurve();
  }

  async function imageBitmapOf(im) {
    const c = document.createElement("canvas");
    drawRGB(c, im);
    return createImageBitmap(c);
  }

  function drawCurve() {
    const p = state.path;
    const svg = $("#path-curve");
    const NS = "http://www.w3.org/2000/svg";
    const W = 320;
    const H = 240;
    const m = { l: 40, r: 12, t: 12, b: 32 };
    const x = (t) => m.l + t * (W - m.l - m.r);
    const y = (v) => H - m.b - v * (H - m.t - m.b);
    const node = (tag, attrs, text) => {
      const n = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
      if (text !== undefined) n.textContent = text;
      return n;
    };
    const times = Array.from(p.times.data);
    const pts = times.map((t, k) => `${x(t).toFixed(1)},${y(p.F[k]).toFixed(1)}`).join(" ");
    const kids = [
      node("rect", { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, class: "frame" }),
      ...[0, 0.5, 1].map((v) => node("text", { x: m.l - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, v.toFixed(1))),
      ...[0, 0.5, 1].map((v) => node("text", { x: x(v), y: H - m.b + 16, class: "tick", "text-anchor": "middle" }, v.toFixed(1))),
      node("text", { x: (m.l + W - m.r) / 2, y: H - 4, class: "label", "text-anchor": "middle" }, "t"),
      node("polyline", { points: pts, class: "line" }),
      node("line", { id: "path-cursor", x1: 0, x2: 0, y1: m.t, y2: H - m.b, class: "cursor" }),
      node("circle", { id: "path-marker", cx: 0, cy: 0, r: 5, class: "marker" }),
    ];
    svg.replaceChildren(...kids);
    svg.dataset.x0 = m.l;
    svg.dataset.xw = W - m.l - m.r;
    svg.dataset.y0 = H - m.b;
    svg.dataset.yh = H - m.t - m.b;
  }

  function renderSlice() {
    const p = state.path;
    if (!p) return;
    const k = Number($("#path-slider").value);
    const t = p.times.data[k];
    const phi = phiAt(p.path, k, p.T, p.H, p.W);
    const [plo, phiHi] = drawPhi($("#path-phi"), phi);
    $("#path-phi-caption").textContent = `φ(t) in [${fmt(plo, 3)}, ${fmt(phiHi, 3)}]: white = the image kept, black = replaced by the baseline`
      + ($("#path-stretch").checked ? " (stretched)" : "");
    $("#path-phi").dataset.slice = String(k);
    if (p.down) drawPhi($("#path-phi-down"), phiAt(p.down, k, p.T, p.H, p.W));
    const imgCanvas = $("#path-image");
    if (p.images) drawRGB(imgCanvas, slice(p.images, k));
    else {
      const ctx = sized(imgCanvas, p.W, p.H);
      ctx.fillStyle = "#ddd";
      ctx.fillRect(0, 0, p.W, p.H);
    }
    imgCanvas.dataset.slice = String(k);
    const svg = $("#path-curve");
    const cx = Number(svg.dataset.x0) + t * Number(svg.dataset.xw);
    const cy = Number(svg.dataset.y0) - p.F[k] * Number(svg.dataset.yh);
    $("#path-marker").setAttribute("cx", cx.toFixed(1));
    $("#path-marker").setAttribute("cy", cy.toFixed(1));
    $("#path-cursor").setAttribute("x1", cx.toFixed(1));
    $("#path-cursor").setAttribute("x2", cx.toFixed(1));
    $("#path-t").textContent = `t = ${fmt(t, 3)} (slice ${k} of ${p.T + 1}) · F(t) = ${fmt(p.F[k], 3)}`;
  }

  let playing = null;

  function stopPlaying() {
    if (playing) clearInterval(playing);
    playing = null;
    $("#path-play").textContent = "Play";
  }

  function togglePlay() {
    if (playing) return stopPlaying();
    if (!state.path) return;
    $("#path-play").textContent = "Pause";
    const slider = $("#path-slider");
    playing = setInterval(() => {
      const max = Number(slider.max);
      slider.value = String((Number(slider.value) + 1) % (max + 1));
      renderSlice();
    }, 300);
  }

  $("#path-slider").addEventListener("input", renderSlice);
  $("#path-stretch").addEventListener("change", renderSlice);
  $("#path-play").addEventListener("click", togglePlay);
  $("#path-load").addEventListener("click", loadPath);
  $("#path-job").addEventListener("change", () => {
    const rec = state.jobs.get($("#path-job").value);
    if (rec) showPath(rec.job, rec.base);
  });
  $("#path-opacity").addEventListener("input", () => state.path && renderPathStatic());

  // ------------------------------------------------------------------------------------- Denoise
  const PAGE = 8;
  let mrc = null;

  $("#denoise-file").addEventListener("change", async () => {
    const f = $("#denoise-file").files[0];
    if (f) mrc = { name: f.name, b64: bytesToB64(new Uint8Array(await f.arrayBuffer())) };
    $("#denoise-status").textContent = f ? `${f.name} loaded` : "";
  });

  $("#denoise-sample").addEventListener("click", async () => {
    const r = await fetch("static/samples/particles.mrcs");
    if (!r.ok) return notice(`sample: HTTP ${r.status}`);
    mrc = { name: "particles.mrcs", b64: bytesToB64(new Uint8Array(await r.arrayBuffer())) };
    $("#denoise-status").textContent = "particles.mrcs (8 simulated particles at SNR 1/64) loaded";
  });

  async function runDenoise() {
    if (!mrc) return notice("choose an MRC stack (.mrcs) or take the sample");
    const model = $("#denoise-model").value;
    $("#denoise-status").textContent = "denoising…";
    try {
      const r = await api("denoise?particles=1", { model, mrc: mrc.b64 });
      state.denoise = { particles: tensor(r.particles), denoised: tensor(r.denoised), page: 0, response: r };
      const tm = r.timing || {};
      $("#denoise-status").textContent = `${mrc.name}: ${state.denoise.denoised.shape[0]} particles of ${state.denoise.denoised.shape[1]} × ${state.denoise.denoised.shape[2]} through ${r.model} in ${fmt(tm.total_ms, 1)} ms (model ${fmt(tm.inference_ms, 1)} ms)`;
      renderDenoise();
    } catch (e) {
      $("#denoise-status").textContent = "";
      notice(describe(e));
    }
  }

  function renderDenoise() {
    const d = state.denoise;
    const n = d.denoised.shape[0];
    const from = d.page * PAGE;
    const to = Math.min(n, from + PAGE);
    $("#denoise-pager").hidden = n <= PAGE;
    $("#denoise-range").textContent = `particles ${from + 1}–${to} of ${n}`;
    const pairs = [];
    for (let i = from; i < to; i++) {
      const noisy = slice(d.particles, i);
      const den = slice(d.denoised, i);
      const c1 = el("canvas.view.small", { dataset: { particle: i, which: "noisy" } });
      const c2 = el("canvas.view.small", { dataset: { particle: i, which: "denoised" } });
      const [a, b] = percentiles(noisy.data, 0.01, 0.99);
      const [c, e] = percentiles(den.data, 0.01, 0.99);
      drawGray(c1, noisy, a, b);
      drawGray(c2, den, c, e);
      pairs.push(el("div.pair", {}, figure(c1, `#${i + 1} noisy`), figure(c2, `#${i + 1} denoised`)));
    }
    $("#denoise-results").replaceChildren(...pairs);
  }

  $("#denoise-run").addEventListener("click", runDenoise);
  $("#denoise-prev").addEventListener("click", () => {
    if (state.denoise && state.denoise.page > 0) {
      state.denoise.page--;
      renderDenoise();
    }
  });
  $("#denoise-next").addEventListener("click", () => {
    if (state.denoise && (state.denoise.page + 1) * PAGE < state.denoise.denoised.shape[0]) {
      state.denoise.page++;
      renderDenoise();
    }
  });

  // ---------------------------------------------------------------------------------------- start
  bindImageInputs();
  $("#token").value = state.token;
  showTab();
  load().then(restoreJobs).then(() => (document.body.dataset.ready = "1"));
})();
