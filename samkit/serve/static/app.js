// samkit serve: the page. Plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get("token");
  const authHeaders = token ? { "X-Samkit-Token": token } : {};
  const COLORS = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255]];
  const color = (i) => COLORS[i % COLORS.length];

  // Everything the page knows; window.samkit.state is read by the browser test.
  const state = {
    image: null,          // {image_id, width, height, file_name}
    history: [{ points: [], labels: [], box: null, result: null }],  // prompt states; result = predict reply
    position: 0,          // index of the current state in history
    objects: [],          // kept objects: {name, mask (RLE), score, stability_score, points, color}
    everything: null,     // {masks: [...], owner: Int32Array}
    hover: null,          // hover preview reply
    busy: 0,              // model requests in flight (not hover)
    predictions: 0,       // predict replies applied
    mode: "add",          // what a click or tap does: "add" / "remove" a point, "pick" an 'everything' mask
    picked: [],           // indices of picked 'everything' masks
    zoom: 1,              // 1 = the whole image fits the stage
    editing: null,        // the kept object being edited: "Keep object" puts the new mask in its place
    decoding: "starting", // where prompts are decoded: "browser" (onnxruntime-web), "server" (/api/predict)
                          // or, with ?decode=auto (the default), "timing" until both paths are timed
    paths: null,          // auto's choice: {policy, chosen, measuring, samples, medians, ...} (decodepath.js)
    hoverTimes: [],       // ms from a hover's pointer event to its mask drawn (the last 200; benchmarks read it)
  };
  const web = window.SamkitWebDecoder;
  const asked = new URLSearchParams(location.search).get("decode");
  const paths = window.SamkitDecodePath(asked === "browser" || asked === "server" ? asked : "auto");
  state.paths = paths.choice;
  let decoderStarted = Promise.resolve();  // resolves once the page knows where it decodes
  const view = $("view"), ctx = view.getContext("2d");
  let picture = null;     // the image as an HTMLImageElement
  const maskCache = new WeakMap();  // RLE object -> {bits, canvas per colour}

  // ------------------------------------------------------------------ requests
  async function api(path, body, raw, signal) {
    const init = { method: body === undefined ? "GET" : "POST", headers: { ...authHeaders }, signal };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const reply = await fetch(path, init);
    if (!reply.ok) {
      let message = reply.statusText;
      try { message = (await reply.json()).error; } catch (e) { /* not JSON */ }
      if (reply.status === 401) message = "this server needs its token: open the full address samkit serve printed (it ends in ?token=…)";
      throw new Error(message);
    }
    return raw ? reply : reply.json();
  }
  function showDecoding() {
    const status = web.status, label = $("decoding");
    if (status.mode !== "browser") {  // starting, or no browser decoder (forced, missing or failed)
      state.decoding = status.mode;
      label.textContent = status.mode === "server" ? "decoding on the server" : "";
      label.title = status.reason || "";
      return;
    }
    const choice = paths.choice, told = paths.describe();
    state.decoding = choice.policy !== "auto" ? choice.policy : choice.chosen || "timing";
    label.textContent = told.text; label.title = told.title;
  }
  function fallBack(reason) { web.fail(reason); showDecoding(); }
  function timed(path, ms) { if (paths.record(path, ms)) showDecoding(); }  // auto: one more decode timed
  async function fetchBytes(path) { return (await api(path, undefined, true)).arrayBuffer(); }
  async function loadEmbedding(reply) {  // the embedding for in-browser decoding (once per opened image)
    await decoderStarted;
    return fetchEmbedding(reply);
  }
  async function fetchEmbedding(reply) {
    if (web.status.mode !== "browser") return;
    try {
      const answer = await api(`/api/images/${reply.image_id}/embedding`, undefined, true);
      web.setImage(reply.image_id, await answer.arrayBuffer(), answer.headers.get("x-shape").split(",").map(Number));
    } catch (err) { fallBack(`the embedding did not load: ${err.message || err}`); }
  }
  function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }
  function latency(text) { $("latency").textContent = text; }

  // ------------------------------------------------------------------ masks
  function decode(rle) {  // COCO uncompressed RLE (column-major) -> Uint8Array of H*W (row-major)
    let entry = maskCache.get(rle);
    if (entry) return entry;
    const [h, w] = rle.size, bits = new Uint8Array(h * w);
    let index = 0, value = 0;
    for (const run of rle.counts) {
      if (value) for (let k = index; k < index + run; k++) { const x = (k / h) | 0; bits[(k - x * h) * w + x] = 1; }
      index += run; value ^= 1;
    }
    entry = { bits, canvases: {} };
    maskCache.set(rle, entry);
    return entry;
  }
  function maskCanvas(rle, rgb, alpha) {
    const entry = decode(rle), key = rgb.join(",") + "," + alpha;
    if (entry.canvases[key]) return entry.canvases[key];
    const [h, w] = rle.size, canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    const c = canvas.getContext("2d"), pixels = c.createImageData(w, h);
    for (let i = 0; i < entry.bits.length; i++) if (entry.bits[i]) {
      pixels.data.set([rgb[0], rgb[1], rgb[2], alpha], 4 * i);
    }
    c.putImageData(pixels, 0, 0);
    return (entry.canvases[key] = canvas);
  }

  // ------------------------------------------------------------------ drawing
  const current = () => state.history[state.position];
  function selectedMask() {
    const r = current().result;
    return r ? { rle: r.masks[r.selected], score: r.scores[r.selected], stability: r.stability_scores[r.selected] } : null;
  }
  let highlighted = -1;
  function draw() {
    if (!picture) return;
    ctx.clearRect(0, 0, view.width, view.height);
    ctx.drawImage(picture, 0, 0);
    if (state.everything && $("show-everything").checked) {
      ctx.drawImage(state.everything.layer, 0, 0);
      for (const i of state.picked) ctx.drawImage(maskCanvas(state.everything.masks[i].segmentation, [255, 255, 255], 200), 0, 0);
      if (highlighted >= 0) ctx.drawImage(maskCanvas(state.everything.masks[highlighted].segmentation, [255, 255, 255], 120), 0, 0);
    }
    state.objects.forEach((o) => { if (o !== state.editing) ctx.drawImage(maskCanvas(o.mask, o.color, 130), 0, 0); });
    if (state.hover) ctx.drawImage(maskCanvas(state.hover.masks[0], [120, 180, 255], 90), 0, 0);
    const mask = selectedMask();
    if (mask) ctx.drawImage(maskCanvas(mask.rle, [30, 110, 255], 140), 0, 0);
    const s = current(), r = Math.max(3, Math.round(Math.max(view.width, view.height) / 150));
    s.points.forEach((p, i) => {
      ctx.beginPath(); ctx.arc(p[0], p[1], r, 0, 2 * Math.PI);
      ctx.fillStyle = s.labels[i] ? "#1c1" : "#e22"; ctx.fill();
      ctx.lineWidth = Math.max(1, r / 3); ctx.strokeStyle = "#fff"; ctx.stroke();
    });
    const box = dragBox || s.box;
    if (box) { ctx.lineWidth = Math.max(1, r / 2); ctx.strokeStyle = "#ff0"; ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]); }
    buttons();
  }
  function buttons() {  // what can be done now: nothing but opening before an image is open
    const open = state.image !== null, s = current();
    $("undo").disabled = !open || state.position === 0;
    $("redo").disabled = !open || state.position >= state.history.length - 1;
    $("clear").disabled = !open || (!s.points.length && !s.box && !s.result);
    for (const id of ["keep", "everything", "export", "zoom-in", "zoom-out", "zoom-fit"]) $(id).disabled = !open;
    $("mode-pick").disabled = !state.everything;
    if (!state.everything && state.mode === "pick") setMode("add");
    $("keep-picked").disabled = !state.picked.length;
    $("picked-count").textContent = state.picked.length ? plural(state.picked.length, "picked mask") : "";
  }
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  function setMode(mode) {
    state.mode = mode;
    document.querySelectorAll("#modes button").forEach((b) => b.classList.toggle("selected", b.dataset.mode === mode));
  }
  function showCandidates() {
    const box = $("candidates"), r = current().result;
    box.innerHTML = "";
    if (!r || r.masks.length < 2) return;
    r.scores.forEach((score, i) => {
      const b = document.createElement("button");
      b.textContent = `mask ${i + 1} · ${score.toFixed(2)}`;
      b.className = i === r.selected ? "selected" : "";
      b.dataset.candidate = i;
      b.onclick = () => { r.selected = i; showCandidates(); draw(); };
      box.appendChild(b);
    });
  }

  // ------------------------------------------------------------------ opening images
  // The canvas keeps the image's pixels; CSS scales it (zoom 1 fits the stage) and the stage scrolls (pan).
  function fit(anchor) {  // anchor {clientX, clientY, x, y}: image point (x, y) stays under that client point
    if (view.hidden) return;
    const stage = $("stage");
    const scale = state.zoom * Math.min((stage.clientWidth - 8) / view.width, (stage.clientHeight - 8) / view.height);
    view.style.width = `${Math.max(1, Math.floor(view.width * scale))}px`; view.style.height = `${Math.max(1, Math.floor(view.height * scale))}px`;
    if (anchor) {
      const rect = view.getBoundingClientRect();
      stage.scrollLeft += rect.left + anchor.x * rect.width / view.width - anchor.clientX;
      stage.scrollTop += rect.top + anchor.y * rect.height / view.height - anchor.clientY;
    }
  }
  // Zoom by factor; the image point under (clientX, clientY) ends under (toX, toY) (a pinch also pans).
  function zoomAt(factor, clientX, clientY, toX = clientX, toY = clientY) {
    if (!state.image) return;
    const rect = view.getBoundingClientRect();
    if (clientX === undefined) { const r = $("stage").getBoundingClientRect(); toX = clientX = r.left + r.width / 2; toY = clientY = r.top + r.height / 2; }
    const x = (clientX - rect.left) * view.width / rect.width, y = (clientY - rect.top) * view.height / rect.height;
    state.zoom = Math.min(Math.max(state.zoom * factor, 1), 32);
    fit({ clientX: toX, clientY: toY, x, y });
  }
  window.addEventListener("resize", () => fit());
  function setProgress(text) {
    $("progress").hidden = !text; $("progress-text").textContent = text || "";
  }
  function upload(file) {  // XHR for the upload's own progress; then the encoder runs on the server
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/api/images");
      for (const [k, v] of Object.entries(authHeaders)) xhr.setRequestHeader(k, v);
      xhr.setRequestHeader("Content-Type", file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream");
      xhr.setRequestHeader("X-File-Name", encodeURIComponent(file.name || "upload").slice(0, 200));
      const started = performance.now();
      let timer = null;
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) setProgress(`uploading ${Math.round(100 * e.loaded / e.total)}%`); };
      xhr.upload.onload = () => {
        timer = setInterval(() => setProgress(`embedding… ${((performance.now() - started) / 1000).toFixed(1)} s`), 100);
      };
      xhr.onload = () => {
        clearInterval(timer);
        let reply = {};
        try { reply = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
        xhr.status === 200 ? resolve(reply) : reject(new Error(reply.error || xhr.statusText));
      };
      xhr.onerror = () => { clearInterval(timer); reject(new Error("upload failed")); };
      setProgress("uploading…");
      xhr.send(file);
    });
  }
  async function opened(reply) {
    const blob = await (await api(`/api/images/${reply.image_id}/pixels`, undefined, true)).blob();
    const img = new Image();
    img.src = URL.createObjectURL(blob);
    await img.decode();
    picture = img;
    state.image = reply;
    state.history = [{ points: [], labels: [], box: null, result: null }];
    state.position = 0; state.objects = []; state.everything = null; state.hover = null; state.picked = []; state.zoom = 1; state.editing = null;
    view.width = reply.width; view.height = reply.height; view.hidden = false;
    $("drop-hint").hidden = true; fit();
    await loadEmbedding(reply);
    $("everything-count").textContent = ""; $("everything-hint").hidden = true; renderObjects(); showCandidates(); draw();
    latency(reply.cached ? "encoder: cached" : `encoder ${reply.encoder_ms.toFixed(0)} ms`);
  }
  async function openFile(file) {
    showError(null); state.busy++;
    try { await opened(await upload(file)); } catch (err) { showError(err); } finally { state.busy--; setProgress(null); }
  }
  async function openFromFolder(name) {
    showError(null); state.busy++; setProgress("embedding…");
    try { await opened(await api("/api/images/open", { name })); } catch (err) { showError(err); } finally { state.busy--; setProgress(null); }
  }

  // ------------------------------------------------------------------ prompts
  function toImage(e) {
    const rect = view.getBoundingClientRect();
    const x = (e.clientX - rect.left) * view.width / rect.width, y = (e.clientY - rect.top) * view.height / rect.height;
    return [Math.min(Math.max(Math.round(x * 10) / 10, 0), view.width), Math.min(Math.max(Math.round(y * 10) / 10, 0), view.height)];
  }
  function promptBody(s, previous) {
    const single = s.points.length === 1 && !s.box;
    const body = { image_id: state.image.image_id, points: s.points, labels: s.labels, box: s.box, multimask: single };
    // SAM is meant to be refined: the previous mask's low-res logits go back in with each change.
    if (previous && previous.result && previous.result.logits_id && !single) body.mask_input = { logits_id: previous.result.logits_id, index: previous.result.selected };
    return body;
  }
  async function change(mutate) {
    if (!state.image) return;
    const previous = current();
    const next = { points: previous.points.slice(), labels: previous.labels.slice(), box: previous.box, result: null };
    mutate(next);
    state.history = state.history.slice(0, state.position + 1);
    state.history.push(next); state.position++;
    state.hover = null; draw();
    if (!next.points.length && !next.box) { showCandidates(); return; }
    const started = performance.now();
    state.busy++;
    try {
      const body = promptBody(next, previous);
      let reply = null;
      const ready = web.ready(state.image.image_id), before = previous.result, single = next.points.length === 1 && !next.box;
      // A prompt that refines the previous mask stays on the path that made it (the browser keeps its low-res
      // logits, the server its logits_id); any other goes where the choice says.
      const path = before && !single ? (before.local && ready ? "browser" : "server") : paths.next(ready);
      if (path === "browser") {
        // The previous mask's low-res logits go back in, as the server does with logits_id.
        const maskInput = before && before.lowRes && !single ? before.lowRes[before.selected] : null;
        try {
          const sent = performance.now();
          reply = await web.decode(state.image, { points: next.points, labels: next.labels, box: next.box, maskInput }, single);
          timed("browser", performance.now() - sent);
          latency(`decoder ${reply.decoder_ms.toFixed(0)} ms in the browser`);
        } catch (err) { fallBack(`decoding in the browser failed: ${err.message || err}`); }
      }
      if (reply === null) {
        const sent = performance.now();
        reply = await api("/api/predict", body);
        timed("server", performance.now() - sent);
        latency(`decoder ${reply.decoder_ms.toFixed(0)} ms (round trip ${(performance.now() - started).toFixed(0)} ms)`);
      }
      let best = 0; reply.scores.forEach((s, i) => { if (s > reply.scores[best]) best = i; });
      next.result = { ...reply, selected: best, body };
      state.predictions++;
      showError(null);
    } catch (err) { showError(err); } finally { state.busy--; }
    showCandidates(); draw();
  }
  function undo() { if (state.position > 0) { state.position--; state.hover = null; showCandidates(); draw(); } }
  function redo() { if (state.position < state.history.length - 1) { state.position++; showCandidates(); draw(); } }
  function clear() { change((s) => { s.points = []; s.labels = []; s.box = null; }); }

  // Hover preview: at most one request in flight and one every 80 ms; replies older than the shown one are dropped.
  let hoverSeq = 0, hoverShown = 0, hoverInFlight = false, hoverPending = null, hoverLast = 0;
  function hoverAt(point) {
    if (!$("hover").checked || !state.image || dragStart) return;
    hoverPending = { point, at: performance.now() };
    pumpHover();
  }
  async function pumpHover() {  // in the browser: no pause between previews, one decode at a time
    const local = paths.next(web.ready(state.image.image_id)) === "browser", wait = local ? 0 : 80 - (performance.now() - hoverLast);
    if (hoverInFlight || !hoverPending) return;
    if (wait > 0) { setTimeout(pumpHover, wait); return; }
    const { point, at } = hoverPending, seq = ++hoverSeq, s = current();
    hoverPending = null; hoverInFlight = true; hoverLast = performance.now();
    try {
      const prompt = { points: s.points.concat([point]), labels: s.labels.concat([1]), box: s.box };
      const sent = performance.now(), reply = local
        ? await web.decode(state.image, { ...prompt, maskInput: null }, false)
        : await api("/api/predict", { image_id: state.image.image_id, ...prompt, multimask: false });
      timed(local ? "browser" : "server", performance.now() - sent);
      if (seq > hoverShown && hoverPointer) {
        hoverShown = seq; state.hover = { ...reply, prompt }; draw();
        state.hoverTimes.push(performance.now() - at);
        if (state.hoverTimes.length > 200) state.hoverTimes.shift();
      }
    } catch (err) { /* a preview that fails is only a preview */ } finally { hoverInFlight = false; }
    if (hoverPending) pumpHover();
  }

  // ------------------------------------------------------------------ pointer (mouse, pen and touch)
  // Mouse: left click adds (Remove mode or Shift: removes), right click removes, drag draws a box, the wheel
  // zooms, a middle-button or Space+drag pans. Touch: a tap acts by the mode, a one-finger drag draws a box,
  // two fingers pinch to zoom and pan. In Pick mode a click or tap picks or unpicks an 'everything' mask.
  let dragStart = null, dragBox = null, hoverPointer = false, panning = null, spaceDown = false;
  const touches = new Map();  // pointerId -> last {x, y} of the fingers on the canvas
  let pinch = null;           // {distance, x, y} of the two fingers at the last move
  view.addEventListener("contextmenu", (e) => e.preventDefault());
  function twoFingers() {
    const [a, b] = [...touches.values()];
    return { distance: Math.hypot(a.x - b.x, a.y - b.y), x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
  }
  view.addEventListener("pointerdown", (e) => {
    if (!state.image) return;
    view.setPointerCapture(e.pointerId);
    if (e.pointerType === "touch") {
      touches.set(e.pointerId, { x: e.clientX, y: e.clientY });
      if (touches.size === 2) { pinch = twoFingers(); dragStart = null; dragBox = null; draw(); return; }
      if (touches.size > 2) return;
    }
    if (e.button === 1 || (e.button === 0 && spaceDown)) { e.preventDefault(); panning = { x: e.clientX, y: e.clientY }; return; }
    if (e.button === 2) { const p = toImage(e); change((s) => { s.points.push(p); s.labels.push(0); }); return; }
    if (e.button === 0) dragStart = { point: toImage(e), x: e.clientX, y: e.clientY, shift: e.shiftKey };
  });
  view.addEventListener("pointermove", (e) => {
    if (e.pointerType === "touch" && touches.has(e.pointerId)) {
      touches.set(e.pointerId, { x: e.clientX, y: e.clientY });
      if (pinch && touches.size === 2) {
        const now = twoFingers();
        zoomAt(pinch.distance > 0 ? now.distance / pinch.distance : 1, pinch.x, pinch.y, now.x, now.y);
        pinch = now;
        return;
      }
    }
    if (panning) {
      const stage = $("stage");
      stage.scrollLeft -= e.clientX - panning.x; stage.scrollTop -= e.clientY - panning.y;
      panning = { x: e.clientX, y: e.clientY };
      return;
    }
    const p = toImage(e);
    if (dragStart) {
      if (state.mode !== "pick" && Math.hypot(e.clientX - dragStart.x, e.clientY - dragStart.y) > 5) {
        const a = dragStart.point;
        dragBox = [Math.min(a[0], p[0]), Math.min(a[1], p[1]), Math.max(a[0], p[0]), Math.max(a[1], p[1])];
        draw();
      }
      return;
    }
    if (e.pointerType !== "mouse") return;  // hover needs a pointer that hovers
    hoverPointer = true;
    if (state.everything && $("show-everything").checked) {
      const i = ownerAt(p);
      if (i !== highlighted) {
        highlighted = i;
        const m = state.everything.masks[i];
        $("info").textContent = i >= 0 ? `mask ${i}: area ${m.area}, IoU ${m.predicted_iou.toFixed(2)}` : "";
        draw();
      }
    }
    if (state.mode !== "pick") hoverAt(p);
  });
  const ownerAt = (p) => state.everything.owner[Math.min(Math.floor(p[1]), view.height - 1) * view.width + Math.min(Math.floor(p[0]), view.width - 1)];
  view.addEventListener("pointerleave", (e) => {
    if (e.pointerType !== "mouse") return;
    hoverPointer = false; state.hover = null; hoverPending = null; draw();
  });
  function pointerEnd(e) {
    if (e.pointerType === "touch") {
      touches.delete(e.pointerId);
      if (pinch) { if (touches.size === 0) pinch = null; return; }  // the end of a pinch is no tap
    }
    if (panning) { panning = null; return; }
    if (!dragStart || e.button !== 0 || e.type === "pointercancel") { dragStart = null; dragBox = null; return; }
    const start = dragStart, box = dragBox;
    dragStart = null; dragBox = null;
    if (state.mode === "pick") { pick(start.point); return; }
    if (box && box[2] > box[0] && box[3] > box[1]) change((s) => { s.box = box; });
    else {
      const label = (state.mode === "remove") !== start.shift ? 0 : 1;
      change((s) => { s.points.push(start.point); s.labels.push(label); });
    }
  }
  view.addEventListener("pointerup", pointerEnd);
  view.addEventListener("pointercancel", pointerEnd);
  $("stage").addEventListener("wheel", (e) => {
    if (!state.image) return;
    e.preventDefault();
    zoomAt(Math.exp(-e.deltaY / 300), e.clientX, e.clientY);
  }, { passive: false });
  window.addEventListener("keyup", (e) => { if (e.key === " ") spaceDown = false; });
  window.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    if (e.key === " " && state.image) { spaceDown = true; e.preventDefault(); }
    if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); e.shiftKey ? redo() : undo(); }
    if ((e.ctrlKey || e.metaKey) && e.key === "y") { e.preventDefault(); redo(); }
  });

  // ------------------------------------------------------------------ objects, everything, export
  function renderObjects() {
    const list = $("objects");
    list.innerHTML = "";
    state.objects.forEach((o, i) => {
      const li = document.createElement("li");
      li.innerHTML = `<span class="swatch" style="background:rgb(${o.color})"></span><span></span><button class="edit">edit</button><button class="remove">remove</button>`;
      li.children[1].textContent = `${o.name} (${o.area} px)${o === state.editing ? " · editing" : ""}`;
      li.children[2].onclick = () => edit(i);
      li.children[3].onclick = () => { if (o === state.editing) state.editing = null; state.objects.splice(i, 1); renderObjects(); draw(); };
      list.appendChild(li);
    });
  }
  function edit(i) {  // a kept object back to the prompt it was kept with; "Keep object" puts it back in place
    const o = state.objects[i];
    state.editing = o;
    state.history = state.history.slice(0, state.position + 1);
    state.history.push({ points: o.prompt.points.slice(), labels: o.prompt.labels.slice(), box: o.prompt.box, result: o.prompt.result });
    state.position++;
    $("name").value = o.name; state.hover = null;
    renderObjects(); showCandidates(); draw();
  }
  function keep() {
    const mask = selectedMask(), s = current();
    if (!mask) { showError("nothing to keep: click the image first"); return; }
    const at = state.objects.indexOf(state.editing), n = at >= 0 ? at + 1 : state.objects.length + 1;
    const object = {
      name: $("name").value.trim() || `object ${n}`, mask: mask.rle, score: mask.score, stability_score: mask.stability,
      points: s.points, color: at >= 0 ? state.editing.color : color(n + 3), area: s.result.areas[s.result.selected],
      prompt: { points: s.points, labels: s.labels, box: s.box, result: s.result },
    };
    if (at >= 0) state.objects[at] = object; else state.objects.push(object);
    state.editing = null;
    $("name").value = "";
    renderObjects();
    change((t) => { t.points = []; t.labels = []; t.box = null; });
  }
  function settings() {
    const out = {};
    for (const k of ["points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_n_layers"]) out[k] = Number($(k).value);
    return out;
  }
  function pick(point) {  // Pick mode: the 'everything' mask under the point in or out of the picked set
    const i = ownerAt(point);
    if (i < 0) { $("info").textContent = "no mask here"; return; }
    const at = state.picked.indexOf(i);
    if (at >= 0) state.picked.splice(at, 1); else state.picked.push(i);
    draw();
  }
  function pickedObjects() {
    return state.picked.map((i) => {
      const m = state.everything.masks[i];
      return { name: `mask ${i}`, mask: m.segmentation, score: m.predicted_iou, stability_score: m.stability_score, points: [], area: m.area };
    });
  }
  function keepPicked() {  // each picked mask becomes a kept object (editable like the others)
    const base = $("name").value.trim();
    for (const o of pickedObjects()) {
      const n = state.objects.length + 1;
      const result = { masks: [o.mask], scores: [o.score], stability_scores: [o.stability_score], areas: [o.area], selected: 0, logits_id: null };
      state.objects.push({ ...o, name: base ? `${base} ${n}` : o.name, color: color(n + 3), prompt: { points: [], labels: [], box: null, result } });
    }
    state.picked = []; $("name").value = "";
    renderObjects(); draw();
  }
  let running = null;  // {controller, timer} of the 'everything' in flight
  async function cancelEverything() {
    if (!running) return;
    running.controller.abort();
    try { await api("/api/everything/cancel", { image_id: state.image.image_id }); } catch (err) { /* it ended meanwhile */ }
  }
  async function everything() {
    if (!state.image || running) return;
    showError(null); state.busy++;
    const started = performance.now(), controller = new AbortController();
    const tick = () => setProgress(`segmenting everything… ${((performance.now() - started) / 1000).toFixed(1)} s`);
    running = { controller, timer: setInterval(tick, 100) };
    tick(); $("cancel").hidden = false;
    try {
      const reply = await api("/api/everything", { image_id: state.image.image_id, ...settings() }, false, controller.signal);
      const w = view.width, h = view.height, owner = new Int32Array(w * h).fill(-1);
      const layer = document.createElement("canvas"); layer.width = w; layer.height = h;
      const c = layer.getContext("2d");
      // Larger masks first, so that each pixel belongs to the smallest mask covering it.
      const order = reply.masks.map((m, i) => i).sort((a, b) => reply.masks[b].area - reply.masks[a].area);
      for (const i of order) {
        const bits = decode(reply.masks[i].segmentation).bits;
        for (let k = 0; k < bits.length; k++) if (bits[k]) owner[k] = i;
        c.drawImage(maskCanvas(reply.masks[i].segmentation, color(i), 110), 0, 0);
      }
      state.everything = { masks: reply.masks, owner, layer };
      highlighted = -1; state.picked = [];
      $("everything-count").textContent = plural(reply.masks.length, "mask");
      $("everything-hint").hidden = reply.masks.length > 0;
      latency(`everything ${reply.amg_ms.toFixed(0)} ms (round trip ${(performance.now() - started).toFixed(0)} ms)`);
    } catch (err) {
      if (controller.signal.aborted) $("everything-count").textContent = "cancelled"; else showError(err);
    } finally {
      clearInterval(running.timer); running = null; $("cancel").hidden = true;
      state.busy--; setProgress(null);
    }
    draw();
  }
  async function exportResult() {
    if (!state.image) return;
    const source = $("export-source").value, format = $("export-format").value;
    const body = { image_id: state.image.image_id, format, source: source === "everything" ? "everything" : "objects" };
    if (source === "current") {
      const mask = selectedMask();
      if (!mask) { showError("no current mask to export"); return; }
      body.objects = [{ name: "current", mask: mask.rle, score: mask.score, stability_score: mask.stability, points: current().points }];
    } else if (source === "objects" || source === "picked") {
      const list = source === "objects" ? state.objects : pickedObjects();
      if (!list.length) { showError(source === "objects" ? "no kept objects to export" : "no picked masks: pick some in Pick mode"); return; }
      body.objects = list.map((o) => ({ name: o.name, mask: o.mask, score: o.score, stability_score: o.stability_score, points: o.points }));
    }
    try {
      const reply = await api("/api/export", body, true);
      const header = reply.headers.get("content-disposition") || "";
      const exact = /filename\*=UTF-8''([^;]+)/i.exec(header), plain = /filename="([^"]+)"/.exec(header);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(await reply.blob());
      a.download = exact ? decodeURIComponent(exact[1]) : plain ? plain[1] : "export";
      document.body.appendChild(a); a.click(); a.remove();
      showError(null);
    } catch (err) { showError(err); }
  }

  // ------------------------------------------------------------------ wiring
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) openFile(e.target.files[0]); e.target.value = ""; });
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault(); stage.classList.remove("dragging");
    if (e.dataTransfer.files[0]) openFile(e.dataTransfer.files[0]);
  });
  $("undo").onclick = undo; $("redo").onclick = redo; $("clear").onclick = clear; $("keep").onclick = keep;
  $("everything").onclick = everything; $("export").onclick = exportResult;
  $("cancel").onclick = cancelEverything; $("keep-picked").onclick = keepPicked;
  document.querySelectorAll("#modes button").forEach((b) => { b.onclick = () => setMode(b.dataset.mode); });
  $("zoom-in").onclick = () => zoomAt(1.5); $("zoom-out").onclick = () => zoomAt(1 / 1.5);
  $("zoom-fit").onclick = () => { state.zoom = 1; fit(); };
  buttons();
  $("show-everything").onchange = draw;
  $("folder").onchange = (e) => { if (e.target.value) openFromFolder(e.target.value); };
  api("/api/health").then((health) => {
    decoderStarted = web.start(health.browser_decoder, fetchBytes).then(() => {
      showDecoding();
      if (state.image) return fetchEmbedding(state.image);  // an image opened while the runtime loaded
    });
    for (const [k, v] of Object.entries(health.everything_settings)) if ($(k)) $(k).value = v;
    latency(`${health.device} · ${health.dtype}`);
    if (health.images_folder) return api("/api/images").then((reply) => {
      const select = $("folder");
      for (const name of reply.images) { const o = document.createElement("option"); o.value = o.textContent = name; select.appendChild(o); }
      select.hidden = false;
      if (reply.images.length === 1) { select.value = reply.images[0]; openFromFolder(reply.images[0]); }  // make serve's demo photo
    });
  }).catch(showError);
  window.samkit = { state, decoderStarted: () => decoderStarted, undo, redo, clear, keep, everything, exportResult, openFile, zoomAt, edit };
})();
