// The SG-LoRA page: plain JavaScript over the public API, no build step.
//   POST /generate/preview  -> chosen experts, weights, similarities, seed, ETag (JSON)
//   POST /generate          -> the LoRA file (same request + the seed: the same bytes)
//   POST /retrieve          -> image/caption scores with the LoRA (the same request) and zero-shot
"use strict";

const $ = (id) => document.getElementById(id);
// The service's root path behind a proxy's path prefix (uvicorn --root-path), written into the page.
const ROOT = document.querySelector('meta[name="sglora-root"]')?.content || "";
let current = null; // the last /generate/preview answer plus the request that produced it
let uploads = []; // [{file, url}]
let previews = 0; // counts previews: a retrieval answered after another preview is dropped
let retrieving = false;
let scoring = []; // the images of the retrieval in flight
let scored = []; // the images of the scores shown: their thumbnails use the same object URLs

// An image's object URL is revoked once nothing shows it: not the picker, the scores or a retrieval in flight.
function release(images) {
  for (const u of images) {
    if (!uploads.includes(u) && !scoring.includes(u) && !scored.includes(u)) URL.revokeObjectURL(u.url);
  }
}

// JSON of a generation request. A seed stays the digits typed: up to 2^63 - 1, beyond what a JavaScript
// number holds exactly (2^53), where Number() would round it to another seed and another LoRA.
function requestJson(body) {
  const { seed, ...rest } = body;
  const json = JSON.stringify(rest);
  return seed === undefined ? json : `${json.slice(0, -1)}${json.length > 2 ? "," : ""}"seed":${seed}}`;
}

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

// A full queue (429) or a service starting or draining (503) says when to come back: retried twice after
// its Retry-After (at most 10 s) before the refusal is shown.
// `busy`: the element saying the request runs, which says the wait meanwhile.
async function send(url, options, busy = null, retries = 2) {
  const said = busy && busy.textContent;
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(url, options);
    if ((r.status !== 429 && r.status !== 503) || attempt === retries) return r;
    const wait = Math.min(Number(r.headers.get("Retry-After")) || 1, 10);
    if (busy) busy.textContent = `${r.status === 429 ? "queue full" : "service unavailable"} (${r.status}), retrying in ${wait} s…`;
    await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
    if (busy) busy.textContent = said; // the retry runs
  }
}

// The JSON of a successful answer; an Error naming what came instead (a proxy's login page, say).
async function answerJson(r) {
  const type = r.headers.get("Content-Type") || "";
  if (!type.includes("json")) throw new Error(`unexpected answer (${r.status}, ${type || "no content type"}): not the service's JSON`);
  return r.json();
}

// What a failed call says: a fetch that could not reach the service (TypeError), or anything else by its message.
function failure(e) {
  return e instanceof TypeError ? `network error: ${e.message}` : String((e && e.message) || e);
}

// "422 · top_k: must be ..."; label(field) may say more of the field (e.g. which file images[1] is).
async function errorText(response, label = (field) => field) {
  try {
    const body = await response.json();
    const d = body.detail || {};
    if (typeof d === "string") return `${response.status}: ${d}`;
    return `${response.status}${d.field ? ` · ${label(d.field)}` : ""}: ${d.reason || "request refused"}`;
  } catch (_) {
    return `${response.status}: ${response.statusText || "request failed"}`;
  }
}

function showError(box, text) {
  box.textContent = text;
  box.hidden = !text;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- readiness -----------------------------------------------------------------------------------
async function loadStatus() {
  const box = $("status");
  try {
    const r = await fetch(`${ROOT}/ready`);
    const s = await r.json();
    if (r.ok) {
      box.textContent = `ready · ${s.experts} experts · ${s.backbone}`;
      box.className = "status ok";
      const cache = s.redis_problem ? `${s.redis} (${s.redis_problem})` : s.redis;
      $("version-out").textContent = `artefact version ${s.artifact_version} · cache ${cache}`;
    } else {
      box.textContent = s.status || "not ready";
      box.className = "status warn";
      setTimeout(loadStatus, 2000);
    }
  } catch (_) {
    box.textContent = "unreachable";
    box.className = "status warn";
    setTimeout(loadStatus, 2000);
  }
}

// ---- generation ----------------------------------------------------------------------------------
function generationRequest() {
  const body = { description: $("description").value, method: $("method").value };
  const seed = $("seed").value.trim();
  const topK = $("top-k").value.trim();
  const temperature = $("temperature").value.trim();
  // The digits (requestJson), without leading zeros ("007" is no JSON number): the pattern allows nothing else.
  if (seed) body.seed = seed.replace(/^0+(?=\d)/, "");
  if (topK) body.top_k = Number(topK);
  if (temperature) body.temperature = Number(temperature);
  return body;
}

async function generate(event) {
  event.preventDefault();
  showError($("error"), "");
  $("generate").disabled = true;
  $("generate-busy").hidden = false;
  try {
    const request = generationRequest();
    const r = await send(`${ROOT}/generate/preview`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: requestJson(request),
    }, $("generate-busy"));
    if (!r.ok) {
      showError($("error"), await errorText(r));
      return;
    }
    const info = await answerJson(r);
    // A seed typed is kept as typed (the JSON answer's number may have lost digits beyond 2^53); a drawn
    // one is below 2^53 (the service's choice, for this reason).
    current = { info, request, seed: info.seed === null ? null : (request.seed ?? String(info.seed)) };
    previews++;
    showError($("download-error"), "");
    $("download-changed").hidden = true;
    showError($("retrieval-error"), ""); // of the previous preview's retrieval
    $("retrieval-note").hidden = true;
    renderExperts(current);
    $("result").hidden = false;
    $("retrieval").hidden = false;
    $("rankings").hidden = true;
    updateRetrieveButton();
  } catch (e) {
    showError($("error"), failure(e));
  } finally {
    $("generate").disabled = false;
    $("generate-busy").hidden = true;
  }
}

function renderExperts({ info, seed }) {
  $("method-out").textContent = info.method;
  $("seed-out").textContent = seed === null ? "— (deterministic)" : seed;
  // The soups use no softmax (equal weights); model-soup takes every expert.
  const k = info.method === "model-soup" ? "all" : String(info.top_k);
  const t = info.method === "model-soup" || info.method === "adapter-soup" ? "—" : String(info.temperature);
  $("prior-out").textContent = `${k} / ${t}`;
  $("cache-out").textContent = info.cache;
  $("etag-out").textContent = info.etag;
  $("download-note").textContent = `${(info.size_bytes / 1024).toFixed(1)} KiB of weights`;
  const tbody = $("experts-table").querySelector("tbody");
  tbody.replaceChildren(
    ...info.experts.map((e, i) =>
      el(
        "tr",
        { "data-name": e.name, "data-weight": String(e.weight), "data-similarity": String(e.similarity) },
        el("td", { class: "rank" }, String(i + 1)),
        el("td", { class: "name" }, e.name),
        el(
          "td",
          { class: "weight" },
          el("span", { class: "bar", title: "the weights sum to 1" }, el("span", { class: "fill", style: `width:${100 * e.weight}%` })),
          el("span", { class: "value" }, e.weight.toFixed(4)),
        ),
        el("td", { class: "num similarity" }, e.similarity.toFixed(4)),
      ),
    ),
  );
}

// The request the preview answered, with the seed it reported: the same bytes again (from the cache,
// or generated again once they left it), unless the expert repository changed meanwhile.
function seededRequest() {
  const body = { ...current.request };
  if (current.seed !== null) body.seed = current.seed;
  return body;
}

async function download(asZip) {
  if (!current) return;
  showError($("download-error"), "");
  $("download-changed").hidden = true;
  const shown = current.info.etag;
  // The same request with the seed the preview reported: byte-identical to what the preview generated.
  const body = seededRequest();
  const accept = asZip ? "application/zip" : "application/octet-stream";
  const buttons = [$("download-safetensors"), $("download-zip")];
  for (const b of buttons) b.disabled = true;
  try {
    const r = await send(`${ROOT}/generate`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: accept }),
      body: requestJson(body),
    });
    if (!r.ok) {
      showError($("download-error"), await errorText(r));
      return;
    }
    // After an expert change the same request gives another LoRA than the one shown: say so.
    const etag = (r.headers.get("ETag") || "").replace(/^W\//, "").replace(/"/g, "").replace(/-zip$/, "");
    if (etag && etag !== shown) {
      $("download-changed").textContent =
        `The expert repository changed since the preview: this file is the LoRA the same request gives now ` +
        `(ETag ${etag}), not the one shown above (${shown}). Generate again to see its experts.`;
      $("download-changed").hidden = false;
    }
    const blob = await r.blob();
    const disposition = r.headers.get("Content-Disposition") || "";
    const match = disposition.match(/filename="([^"]+)"/);
    const a = el("a", { href: URL.createObjectURL(blob), download: match ? match[1] : asZip ? "sglora.zip" : "sglora.safetensors" });
    document.body.append(a);
    a.click();
    setTimeout(() => {
      URL.revokeObjectURL(a.href);
      a.remove();
    }, 1000);
  } catch (e) {
    showError($("download-error"), failure(e));
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

// ---- retrieval -----------------------------------------------------------------------------------
function captionFromName(name) {
  return name.replace(/\.[^.]+$/, "").replace(/[_-]+/g, " ");
}

function addImages() {
  for (const file of $("images").files) {
    uploads.push({ file, url: URL.createObjectURL(file), caption: captionFromName(file.name) });
  }
  $("images").value = "";
  renderUploads();
}

function renderUploads() {
  $("uploads").replaceChildren(
    ...uploads.map((u, i) => {
      const input = el("input", { type: "text", class: "caption-input", value: u.caption });
      input.setAttribute("aria-label", `caption of image ${i + 1}`);
      input.addEventListener("input", () => {
        u.caption = input.value;
      });
      const remove = el("button", { type: "button", class: "remove", title: "remove this image" }, "×");
      remove.setAttribute("aria-label", `remove ${u.file.name}`);
      remove.addEventListener("click", () => {
        uploads.splice(i, 1);
        release([u]);
        renderUploads();
      });
      return el("div", { class: "upload" }, el("img", { src: u.url, alt: u.file.name }), input, remove);
    }),
  );
  updateRetrieveButton();
}

function updateRetrieveButton() {
  $("retrieve").disabled = retrieving || !current || uploads.length === 0;
}

async function retrieve() {
  showError($("retrieval-error"), "");
  const sent = [...uploads]; // the images of this request, whatever is added or removed meanwhile
  const previewed = current.info.etag; // the LoRA asked for, whatever is previewed meanwhile
  const captions = sent.map((u) => u.caption);
  const form = new FormData();
  // The request rather than the preview's ETag, which names the LoRA only while the cache holds it.
  for (const [key, value] of Object.entries(seededRequest())) form.append(key, String(value));
  form.append("zero_shot", "true");
  for (const c of captions) form.append("captions", c);
  for (const u of sent) form.append("images", u.file, u.file.name);
  const preview = previews;
  retrieving = true;
  scoring = sent;
  updateRetrieveButton();
  $("rankings").hidden = true; // an earlier run's scores are not this request's
  $("retrieval-note").hidden = true;
  $("retrieve-busy").hidden = false;
  try {
    const r = await send(`${ROOT}/retrieve`, { method: "POST", headers: headers(), body: form }, $("retrieve-busy"));
    if (preview !== previews) return; // another description was previewed meanwhile: these scores are not its
    if (!r.ok) {
      // The service counts images from 0 (images[1]); the page shows them by name.
      const label = (field) => {
        const m = /^(images|captions)\[(\d+)\]$/.exec(field);
        const u = m && sent[Number(m[2])];
        return u ? `${field} (${m[1] === "images" ? "" : "caption of "}${u.file.name})` : field;
      };
      showError($("retrieval-error"), await errorText(r, label));
      return;
    }
    const body = await answerJson(r);
    const regenerated = body.adapter.etag !== previewed;
    $("retrieval-note").textContent = regenerated
      ? `The expert repository changed since the preview: scored with the LoRA the same request gives now (ETag ${body.adapter.etag}).`
      : "";
    $("retrieval-note").hidden = !regenerated;
    renderScores($("lora-table"), $("lora-recall"), body.lora, body.texts, sent);
    renderScores($("zs-table"), $("zs-recall"), body.zero_shot, body.texts, sent);
    const shown = scored;
    scored = sent;
    release(shown);
    $("rankings").hidden = false;
  } catch (e) {
    showError($("retrieval-error"), failure(e));
  } finally {
    retrieving = false;
    scoring = [];
    release(sent);
    $("retrieve-busy").hidden = true;
    updateRetrieveButton();
  }
}

function renderScores(table, recallBox, ranking, texts, images) {
  const head = el("tr", {}, el("th", {}, "image"), ...texts.map((t, j) => el("th", { class: "num", title: t }, `${j + 1}. ${t}`)));
  table.querySelector("thead").replaceChildren(head);
  table.querySelector("tbody").replaceChildren(
    ...ranking.scores.map((row, i) => {
      const best = ranking.image_to_text[i][0];
      return el(
        "tr",
        {},
        el("td", { class: "thumb" }, el("img", { src: images[i] ? images[i].url : "", alt: "" }), String(i + 1)),
        ...row.map((s, j) => {
          const classes = ["num"];
          if (j === best) classes.push("best");
          if (j === i && texts.length === ranking.scores.length) classes.push("pair");
          return el("td", { class: classes.join(" "), title: `image ${i + 1} · "${texts[j]}"` }, s.toFixed(3));
        }),
      );
    }),
  );
  const rec = ranking.recall_at_1;
  const legend = "bold: the best caption for the image; green: that is its own caption";
  recallBox.textContent = rec
    ? `recall@1 image→text ${(100 * rec.image_to_text).toFixed(0)} % · text→image ${(100 * rec.text_to_image).toFixed(0)} % — ${legend}`
    : "bold: the best caption for each image";
}

// ---- wiring --------------------------------------------------------------------------------------
$("api-key").value = sessionStorage.getItem("sglora-api-key") || "";
$("api-key").addEventListener("change", () => sessionStorage.setItem("sglora-api-key", $("api-key").value.trim()));
$("generate-form").addEventListener("submit", generate);
$("download-safetensors").addEventListener("click", () => download(false));
$("download-zip").addEventListener("click", () => download(true));
$("images").addEventListener("change", addImages);
$("retrieve").addEventListener("click", retrieve);
loadStatus();
