// In-browser mask decoding: the ONNX decoder samkit serve exported for its model (Meta's decoder interface),
// run by onnxruntime-web (wasm backend, one thread) on the image embedding the server sends once per image.
// Any failure leaves the page on the server's /api/predict (app.js asks `ready()` before each prompt;
// while both paths can decode, decodepath.js says which one does).
"use strict";
window.SamkitWebDecoder = (() => {
  let session = null, embedding = null, embeddingOf = null, threshold = 0;
  const status = { mode: "starting", reason: null };  // mode: "browser" | "server" | "starting"

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src; s.onload = resolve; s.onerror = () => reject(new Error(`could not load ${src}`));
      document.head.appendChild(s);
    });
  }
  function fail(reason) { session = null; embedding = null; status.mode = "server"; status.reason = reason; return status; }

  // info: /api/health's browser_decoder; fetchBytes(url) -> ArrayBuffer (with the page's token).
  async function start(info, fetchBytes) {
    if (!info || !info.available) return fail(info ? info.reason : "the server offers no decoder");
    if (new URLSearchParams(location.search).get("decode") === "server") return fail("?decode=server in the address");
    try {
      await loadScript(info.runtime_url + "ort.wasm.min.js");
      const ort = window.ort;
      ort.env.wasm.numThreads = 1; ort.env.wasm.proxy = false;
      ort.env.wasm.wasmPaths = new URL(info.runtime_url, location.href).href;
      const model = new Uint8Array(await fetchBytes(info.decoder_url));
      session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
      threshold = info.mask_threshold;
      status.mode = "browser"; status.reason = null;
    } catch (err) { fail(`onnxruntime-web failed: ${err.message || err}`); }
    return status;
  }
  // The embedding of an opened image: float32 bytes and its shape (1x256x64x64).
  function setImage(imageId, bytes, shape) {
    if (!session) return;
    embedding = new window.ort.Tensor("float32", new Float32Array(bytes), shape); embeddingOf = imageId;
  }
  const ready = (imageId) => session !== null && embeddingOf === imageId;

  // One KxHxW mask's logits (row-major) -> COCO uncompressed RLE (column-major), area and stability score
  // (IoU of the masks thresholded at threshold +- 1; null for an empty mask), as the server reports them.
  function summarise(logits, h, w) {
    const counts = [];
    let run = 0, on = false, area = 0, high = 0, low = 0;
    for (let x = 0; x < w; x++) {
      for (let k = x; k < h * w; k += w) {
        const v = logits[k], now = v > threshold;
        if (now !== on) { counts.push(run); run = 0; on = now; }
        run++;
        if (now) area++;
        if (v > threshold + 1) high++;
        if (v > threshold - 1) low++;
      }
    }
    counts.push(run);
    return { rle: { size: [h, w], counts }, area, stability: low ? high / low : null };
  }

  // prompt: {points [[x, y]], labels [0/1], box [x0, y0, x1, y1] | null, maskInput Float32Array(256*256) | null}
  // in image pixels. Returns a reply shaped like /api/predict's, with the low-res logits (lowRes) in place
  // of a logits_id: 3 candidates with multimask, else the single-mask output.
  async function decode(image, prompt, multimask) {
    const ort = window.ort, started = performance.now();
    const [ih, iw] = image.input_size, sx = iw / image.width, sy = ih / image.height;
    const coords = [], labels = [];
    prompt.points.forEach((p, i) => { coords.push(p[0] * sx, p[1] * sy); labels.push(prompt.labels[i]); });
    if (prompt.box) { const b = prompt.box; coords.push(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy); labels.push(2, 3); }
    else { coords.push(0, 0); labels.push(-1); }  // the padding point SAM's prompt encoder adds without a box
    const n = labels.length, side = 4 * embedding.dims[2];
    const out = await session.run({
      image_embeddings: embedding,
      point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
      point_labels: new ort.Tensor("float32", Float32Array.from(labels), [1, n]),
      mask_input: new ort.Tensor("float32", prompt.maskInput || new Float32Array(side * side), [1, 1, side, side]),
      has_mask_input: new ort.Tensor("float32", Float32Array.of(prompt.maskInput ? 1 : 0), [1]),
      orig_im_size: new ort.Tensor("float32", Float32Array.of(image.height, image.width), [2]),
    });
    const h = image.height, w = image.width, plane = h * w, lowPlane = side * side;
    const reply = { masks: [], scores: [], stability_scores: [], areas: [], lowRes: [], logits_id: null, local: true };
    for (const k of multimask ? [1, 2, 3] : [0]) {
      const s = summarise(out.masks.data.subarray(k * plane, (k + 1) * plane), h, w);
      reply.masks.push(s.rle); reply.areas.push(s.area); reply.stability_scores.push(s.stability);
      reply.scores.push(out.iou_predictions.data[k]);
      reply.lowRes.push(out.low_res_masks.data.slice(k * lowPlane, (k + 1) * lowPlane));
    }
    for (const t of Object.values(out)) if (t.dispose) t.dispose();
    reply.decoder_ms = performance.now() - started;
    return reply;
  }
  return { start, setImage, ready, decode, fail, status };
})();
