// Which path decodes the page's prompts: "browser" (onnxruntime-web) or "server" (/api/predict).
// "auto" (the default) times real decodes on both: the first decodes alternate between the paths until each
// has SAMPLES of them, then the page keeps the path with the lower median. It re-checks (SAMPLES new decodes
// on the other path, SAMPLES - 1 more on the kept one) every RECHECK_EVERY decodes, and as soon as a decode
// takes SLOWER times the kept path's median (and SLOWER_MS more), so a server that becomes busy hands the
// page to the browser. Both paths give the same masks, so timing costs no wrong mask, only a few decodes on
// the slower path. "?decode=browser" / "?decode=server" force a path.
"use strict";
window.SamkitDecodePath = (policy) => {
  const SAMPLES = 3, RECHECK_EVERY = 50, SLOWER = 3, SLOWER_MS = 50;
  const median = (values) => values.slice().sort((a, b) => a - b)[(values.length - 1) >> 1];
  const choice = {
    policy,                             // "auto" | "browser" | "server"
    chosen: null,                       // the path auto keeps (null until both are timed)
    measuring: policy === "auto",       // timing both paths now
    samples: { browser: [], server: [] },  // ms of this round's decodes, per path
    medians: { browser: null, server: null },  // of the last complete round
    since: 0,                           // decodes on the kept path since the last choice
    rounds: 0,                          // choices made (1 = the first)
    recheck: null,                      // why the current round started, after the first
  };
  // The path of the next decode that does not refine an earlier mask (browserReady: the wasm decoder and
  // this image's embedding are loaded).
  function next(browserReady) {
    if (!browserReady) return "server";
    if (policy !== "auto") return policy;
    if (!choice.measuring) return choice.chosen;
    return choice.samples.browser.length <= choice.samples.server.length ? "browser" : "server";
  }
  function startRound(why, slow) {  // slow: the kept path's decode that started it counts in the new round
    choice.samples = { browser: [], server: [] };
    if (slow !== undefined) choice.samples[choice.chosen].push(slow);
    choice.measuring = true; choice.recheck = why; choice.since = 0;
  }
  // A decode on `path` took `ms` (from the request to the reply ready to draw). Returns true when the choice
  // or the round changed (the header then says so).
  function record(path, ms) {
    if (policy !== "auto") return false;
    const samples = choice.samples[path];
    samples.push(ms);
    if (samples.length > SAMPLES) samples.shift();
    if (choice.measuring) {
      if (choice.samples.browser.length < SAMPLES || choice.samples.server.length < SAMPLES) return false;
      choice.medians = { browser: median(choice.samples.browser), server: median(choice.samples.server) };
      choice.chosen = choice.medians.browser < choice.medians.server ? "browser" : "server";
      choice.measuring = false; choice.since = 0; choice.rounds++;
      return true;
    }
    if (path !== choice.chosen) return false;
    const typical = choice.medians[path];
    if (ms > SLOWER * typical && ms - typical > SLOWER_MS) {
      startRound(`a decode took ${ms.toFixed(0)} ms, over ${SLOWER}x the ${typical.toFixed(0)} ms median`, ms);
      return true;
    }
    if (++choice.since >= RECHECK_EVERY) { startRound(`${RECHECK_EVERY} decodes since the last check`); return true; }
    return false;
  }
  // Header text and tooltip for an available browser decoder.
  function describe() {
    const where = (path) => (path === "browser" ? "in the browser" : "on the server");
    if (policy !== "auto") return { text: `decoding ${where(policy)}`, title: `?decode=${policy} in the address` };
    const ms = (path) => `${choice.medians[path].toFixed(0)} ms`;
    const rule = `re-checked every ${RECHECK_EVERY} decodes, or when one takes ${SLOWER}x the median`;
    if (choice.chosen === null) {
      return { text: "decoding: timing both paths", title: `auto: the first ${SAMPLES} decodes on each path are timed, then the faster path is kept` };
    }
    const medians = `median ${ms("browser")} in the browser, ${ms("server")} on the server (${SAMPLES} decodes each)`;
    const now = choice.measuring ? `; re-checking: ${choice.recheck}` : "";
    return { text: `decoding ${where(choice.chosen)} (auto)`, title: `auto, the faster path here: ${medians}; ${rule}${now}` };
  }
  return { next, record, describe, choice };
};
