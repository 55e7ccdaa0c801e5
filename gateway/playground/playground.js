// tokenmesh playground: streams /v2 generations from the edge that served this page.
// Plain browser JavaScript, no build step, no third-party code (the page's CSP allows
// only its own origin). The key lives in sessionStorage and goes only to this origin.
"use strict";

const KEY_STORAGE = "tokenmesh.playground.key";
const SHOWN_HEADERS = /^(x-ratelimit-|x-tokenmesh-|retry-after$|x-request-id$|x-envoy-upstream-service-time$)/;
// Diverging red-blue stops (ColorBrewer RdBu, light half) from p = 0 to p = 1.
const HEAT_STOPS = [
  [0.0, [244, 165, 130]],
  [0.25, [253, 219, 199]],
  [0.5, [247, 247, 247]],
  [0.75, [209, 229, 240]],
  [1.0, [146, 197, 222]],
];
const MAX_MODEL_PAGES = 10;
// google.rpc.Code names by number: a failed choice's final message carries the number.
const GRPC_CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
  "UNAUTHENTICATED",
];
// A choice whose stream ended (cleanly or cut) before its final message.
const NO_FINAL_MESSAGE = "ended without a final message";

const $ = (id) => document.getElementById(id);

// `run` and `controller` belong to the run that owns the output and the buttons: a
// run that was replaced (its fetch aborted) finishes later and must touch neither.
const state = {
  models: [],
  controller: null,
  run: null,
};

function running() {
  return state.controller !== null;
}

// ---- credentials -----------------------------------------------------------

function looksLikeJwt(credential) {
  return /^eyJ[\w-]*\.[\w-]+\.[\w-]*$/.test(credential);
}

function credential() {
  return $("api-key").value.trim();
}

function credentialHeaders() {
  const value = credential();
  return looksLikeJwt(value) ? { authorization: `Bearer ${value}` } : { "x-api-key": value };
}

function rememberKey() {
  const value = credential();
  if (value) {
    sessionStorage.setItem(KEY_STORAGE, value);
  }
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  state.models = [];
  fillModels();
  setText("models-status", "Key forgotten.");
}

// ---- small DOM helpers -----------------------------------------------------

function setText(id, text) {
  $(id).textContent = text;
}

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) {
    node.append(child);
  }
  return node;
}

function fillPairs(id, pairs) {
  const list = $(id);
  list.replaceChildren();
  for (const [name, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    list.append(element("dt", { textContent: name }), element("dd", { textContent: String(value) }));
  }
}

function setStatus(text, runState) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = runState;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function fixed(value, digits = 1) {
  return typeof value === "number" ? value.toFixed(digits) : value;
}

// ---- models ----------------------------------------------------------------

async function errorText(response) {
  const body = await response.text();
  try {
    const parsed = JSON.parse(body);
    const lines = [`HTTP ${response.status}: ${parsed.message || body}`];
    for (const detail of parsed.details || []) {
      for (const violation of detail.field_violations || []) {
        lines.push(`  ${violation.field}: ${violation.description}`);
      }
      if (detail.reason) lines.push(`  reason: ${detail.reason}`);
    }
    return lines.join("\n");
  } catch {
    return `HTTP ${response.status}: ${body || response.statusText}`;
  }
}

async function loadModels(event) {
  event.preventDefault();
  if (!credential()) {
    setText("models-status", "Paste an API key or a JWT first.");
    $("api-key").focus();
    return;
  }
  rememberKey();
  setText("models-status", "Loading models…");
  const models = [];
  let pageToken = "";
  for (let page = 0; page < MAX_MODEL_PAGES; page++) {
    const query = new URLSearchParams({ page_size: "1000" });
    if (pageToken) query.set("page_token", pageToken);
    let response;
    try {
      response = await fetch(`/v2/models?${query}`, { headers: credentialHeaders() });
    } catch (error) {
      setText("models-status", `The edge did not answer: ${error.message}`);
      return;
    }
    if (!response.ok) {
      setText("models-status", await errorText(response));
      return;
    }
    const body = await response.json();
    models.push(...(body.models || []));
    pageToken = body.next_page_token || "";
    if (!pageToken) break;
  }
  state.models = models.filter((m) => m.kind !== "MODEL_KIND_EMBEDDING");
  fillModels();
  const skipped = models.length - state.models.length;
  setText(
    "models-status",
    `${state.models.length} generative model(s)` +
      (skipped ? ` (${skipped} embedding model(s) not shown).` : "."),
  );
}

function fillModels() {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => element("option", { value: m.name, textContent: m.name })));
  if (state.models.some((m) => m.name === previous)) select.value = previous;
  select.disabled = state.models.length === 0;
  // Loading models during a run must not offer a second Generate (the run keeps its Stop).
  $("generate").disabled = state.models.length === 0 || running();
  fillVersions();
}

function selectedModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function fillVersions() {
  const select = $("version");
  const model = selectedModel();
  const options = [];
  if (model) {
    const label = model.default_version ? `default routing (${model.default_version})` : "default routing";
    options.push(element("option", { value: "", textContent: label }));
    for (const version of model.versions || []) {
      const ready = version.state === "MODEL_VERSION_STATE_READY";
      const suffix = ready ? "" : ` (${(version.state || "").replace("MODEL_VERSION_STATE_", "").toLowerCase()})`;
      options.push(element("option", { value: version.version, textContent: version.version + suffix }));
    }
  }
  select.replaceChildren(...options);
  select.disabled = !model;
  updateCurl();
}

// ---- the request -----------------------------------------------------------

function numberField(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${$(id).labels[0].textContent} must be ${integer ? "an integer" : "a number"}`);
  }
  return value;
}

function chatMessages() {
  return [...document.querySelectorAll("#messages .message")].map((item) => ({
    role: item.querySelector(".message-role").value,
    content: item.querySelector(".message-content").value,
  }));
}

function isChat() {
  return $("mode-chat").checked;
}

// Returns {model, body} for POST /v2/models/{model}:generate; throws on a malformed field.
function buildRequest() {
  const body = {};
  const version = $("version").value;
  if (version) body.version = version;
  if (isChat()) {
    body.messages = chatMessages();
  } else {
    body.prompt = $("prompt").value;
  }
  const n = numberField("n", true);
  if (n !== undefined && n !== 1) body.n = n;
  const sampling = {};
  const temperature = numberField("temperature", false);
  const topP = numberField("top-p", false);
  const topK = numberField("top-k", true);
  const seed = $("seed").value.trim();
  if (temperature !== undefined) sampling.temperature = temperature;
  if (topP !== undefined) sampling.top_p = topP;
  if (topK !== undefined) sampling.top_k = topK;
  if (seed !== "") {
    if (!/^[0-9]+$/.test(seed)) throw new Error("seed must be a non-negative integer");
    sampling.seed = seed; // a uint64: JSON takes it as a string, exactly
  }
  if (Object.keys(sampling).length) body.sampling = sampling;
  const maxOutputTokens = numberField("max-output-tokens", true);
  if (maxOutputTokens !== undefined) body.max_output_tokens = maxOutputTokens;
  const stops = $("stop-sequences").value.split("\n").filter((s) => s !== "");
  if (stops.length) body.stop_sequences = stops;
  if ($("logprobs").checked) {
    body.logprobs = true;
    const top = numberField("top-logprobs", true);
    if (top) body.top_logprobs = top;
  }
  return { model: $("model").value, body };
}

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

function curlCommand(model, body) {
  const header = looksLikeJwt(credential())
    ? '"authorization: Bearer $JWT"'
    : '"x-api-key: $TOKENMESH_API_KEY"';
  const url = `${location.origin}/v2/models/${encodeURIComponent(model || "MODEL")}:generate`;
  return [
    `curl -N ${url} \\`,
    `  -H ${header} \\`,
    `  -H "content-type: application/json" \\`,
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

function updateCurl() {
  try {
    const { model, body } = buildRequest();
    setText("curl", curlCommand(model, body));
  } catch (error) {
    setText("curl", `# ${error.message}`);
  }
}

// ---- a run: one streamed generation ----------------------------------------

class Run {
  constructor(n, logprobs) {
    this.startedAt = performance.now();
    this.headersAt = null;
    this.firstTokenAt = null;
    this.endedAt = null;
    this.logprobs = logprobs;
    this.choices = Array.from({ length: n }, (_, index) => this.newChoice(index));
    this.usage = null;
    this.model = null;
    this.requestId = "";
    this.messages = 0;
    this.streaming = false; // the answer was 200 and its body is being read
    this.errors = [];
  }

  newChoice(index) {
    const text = element("div", { className: "choice-text" });
    const finish = element("span", { className: "finish", textContent: "streaming…" });
    const heading = element("h3", {}, [`Choice ${index} `, finish]);
    const article = element("article", { className: "choice" }, [heading, text]);
    article.dataset.index = String(index);
    $("choices").append(article);
    let heat = null;
    if (this.logprobs) {
      heat = element("div", { className: "heat-choice" }, [
        element("span", { className: "heat-label", textContent: `Choice ${index}` }),
      ]);
      heat.dataset.index = String(index);
      $("heatmap").append(heat);
    }
    // ending: why a choice without a final message ended (stopped, cut), once the run ended.
    return { index, text, finish, heat, tokens: 0, final: null, content: "", ending: null };
  }

  choice(index) {
    while (this.choices.length <= index) this.choices.push(this.newChoice(this.choices.length));
    return this.choices[index];
  }

  // Applies one GenerateResponse message of the stream.
  apply(message) {
    this.messages++;
    const choice = this.choice(message.choice_index || 0);
    if (message.text) {
      if (this.firstTokenAt === null) this.firstTokenAt = performance.now();
      choice.content += message.text;
      choice.text.append(message.text);
    }
    choice.tokens += (message.token_ids || []).length;
    if (choice.heat) {
      for (const item of message.logprobs || []) choice.heat.append(heatToken(item));
    }
    if (message.request_id) this.requestId = message.request_id;
    if (message.finish_reason) this.finish(choice, message);
  }

  finish(choice, message) {
    choice.final = message;
    const reason = shortReason(message.finish_reason);
    choice.finish.textContent = message.error ? `· ${reason} (${codeName(message.error.code)})` : `· ${reason}`;
    if (message.usage) this.usage = message.usage;
    if (message.model) this.model = message.model;
    if (message.error) {
      // Every failed choice gets a line: the status of the whole stream is only in
      // its HTTP trailers, which fetch() cannot read.
      this.errors.push(`Choice ${choice.index} failed: ${message.error.message || "error"} (${codeName(message.error.code)})`);
      showError(this.errors.join("\n"));
    }
  }

  unfinished() {
    return this.choices.filter((c) => c.final === null);
  }

  // Choices whose final message says they failed (FINISH_REASON_ERROR with `error`).
  failed() {
    return this.choices.filter((c) => c.final?.error || c.final?.finish_reason === "FINISH_REASON_ERROR");
  }

  // Marks the choices that got no final message with why they ended.
  endUnfinished(ending) {
    for (const choice of this.unfinished()) {
      choice.ending = ending;
      choice.finish.textContent = `· ${ending}`;
    }
  }
}

function codeName(code) {
  return GRPC_CODES[code] ?? `code ${code}`;
}

function shortReason(reason) {
  return String(reason).replace("FINISH_REASON_", "").toLowerCase();
}

function heatColour(p) {
  const clamped = Math.min(1, Math.max(0, p));
  for (let i = 1; i < HEAT_STOPS.length; i++) {
    const [hi, hiRgb] = HEAT_STOPS[i];
    const [lo, loRgb] = HEAT_STOPS[i - 1];
    if (clamped <= hi) {
      const t = (clamped - lo) / (hi - lo);
      const rgb = loRgb.map((c, k) => Math.round(c + (hiRgb[k] - c) * t));
      return `rgb(${rgb.join(", ")})`;
    }
  }
  return `rgb(${HEAT_STOPS[HEAT_STOPS.length - 1][1].join(", ")})`;
}

function heatToken(item) {
  const p = Math.exp(item.logprob);
  // Not focusable: hundreds of tab stops would bury the controls; the text itself is in
  // the choice's panel, and the per-choice table has the confidence.
  const span = element("span", { className: "tok", textContent: item.token });
  // CSSOM writes are allowed under a CSP without 'unsafe-inline' (style attributes are not).
  span.style.backgroundColor = heatColour(p);
  span.dataset.p = p.toFixed(4);
  const alternatives = (item.top_logprobs || [])
    .map((t) => `${JSON.stringify(t.token)} ${Math.exp(t.logprob).toFixed(3)}`)
    .join(", ");
  span.title =
    `${JSON.stringify(item.token)}: p=${p.toFixed(3)}, logprob=${item.logprob.toFixed(3)}` +
    (alternatives ? `\nmost likely: ${alternatives}` : "");
  return span;
}

// Splits an SSE buffer into complete events; returns [events' data, rest].
function takeEvents(buffer) {
  const events = [];
  let rest = buffer;
  for (;;) {
    const match = /\r?\n\r?\n/.exec(rest);
    if (!match) break;
    const block = rest.slice(0, match.index);
    rest = rest.slice(match.index + match[0].length);
    const data = block
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (data) events.push(data);
  }
  return [events, rest];
}

function resetOutput() {
  showError("");
  $("choices").replaceChildren();
  $("heatmap").replaceChildren();
  $("choice-table").tBodies[0].replaceChildren();
  for (const id of ["usage", "timing", "headers"]) $(id).replaceChildren();
  $("append-reply").disabled = true;
}

function showHeaders(response) {
  const pairs = [["HTTP status", response.status]];
  for (const [name, value] of response.headers) {
    if (SHOWN_HEADERS.test(name)) pairs.push([name, value]);
  }
  fillPairs("headers", pairs);
}

function showSummary(run) {
  const usage = run.usage || {};
  fillPairs("usage", [
    ["prompt_tokens", usage.prompt_tokens],
    ["completion_tokens", usage.completion_tokens],
    ["total_tokens", usage.total_tokens],
    ["cached_prompt_tokens", usage.cached_prompt_tokens],
    ["served by", run.model ? `${run.model.name}@${run.model.version}` : undefined],
    ["request_id", run.requestId],
  ]);
  const end = run.endedAt ?? performance.now();
  const decodeS = run.firstTokenAt === null ? 0 : (end - run.firstTokenAt) / 1000;
  const completion = usage.completion_tokens ?? run.choices.reduce((sum, c) => sum + c.tokens, 0);
  const first = run.choices[0]?.final?.timing || {};
  fillPairs("timing", [
    ["response headers (client)", run.headersAt === null ? undefined : `${fixed(run.headersAt - run.startedAt)} ms`],
    ["first token (client)", run.firstTokenAt === null ? undefined : `${fixed(run.firstTokenAt - run.startedAt)} ms`],
    ["total (client)", `${fixed(end - run.startedAt)} ms`],
    ["tokens/s (client, all choices)", decodeS > 0 ? fixed(completion / decodeS) : undefined],
    ["server queue", first.queue_ms === undefined ? undefined : `${fixed(first.queue_ms, 2)} ms`],
    ["server prefill", first.prefill_ms === undefined ? undefined : `${fixed(first.prefill_ms, 2)} ms`],
    ["stream messages", run.messages],
  ]);
  const rows = run.choices.map((c) => {
    const final = c.final || {};
    const timing = final.timing || {};
    const cells = [
      c.index,
      final.finish_reason ? shortReason(final.finish_reason) : (c.ending ?? "running"),
      c.tokens,
      fixed(final.confidence, 3),
      fixed(timing.time_to_first_token_ms),
      fixed(timing.decode_ms),
      fixed(timing.output_tokens_per_second),
    ];
    return element("tr", {}, cells.map((v) => element("td", { textContent: v ?? "" })));
  });
  $("choice-table").tBodies[0].replaceChildren(...rows);
}

async function readStream(response, run) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done || state.run !== run) break;
    let events;
    [events, buffer] = takeEvents(buffer + value);
    for (const data of events) run.apply(JSON.parse(data));
    const tokens = run.choices.reduce((sum, c) => sum + c.tokens, 0);
    setStatus(`Streaming… ${tokens} token(s)`, "streaming");
  }
}

// Says how a run ended. `error` is what ended it early (null when the body was read to
// its end). A choice whose final message has `error` failed; a choice without a final
// message was stopped, or its stream was cut (a worker or the edge went away mid-stream:
// the body ends without its last chunk, and fetch() reports only "network error").
function showOutcome(run, error) {
  const stopped = error?.name === "AbortError";
  const cut = run.unfinished();
  const failed = run.failed();
  if (stopped) {
    run.endUnfinished("stopped");
    setStatus("Stopped.", "stopped");
  } else if (!run.streaming) {
    run.endUnfinished("failed");
    setStatus("Failed.", "error");
    showError(error ? error.message : "No answer.");
  } else if (failed.length) {
    run.endUnfinished(NO_FINAL_MESSAGE);
    const which = failed.map((c) => `choice ${c.index} ended with ${codeName(c.final.error?.code ?? 2)}`);
    setStatus(`Failed: ${which.join(", ")}.`, "error");
  } else if (cut.length) {
    run.endUnfinished(NO_FINAL_MESSAGE);
    const indexes = cut.map((c) => c.index).join(", ");
    const why = error ? ` (the stream was cut: ${error.message})` : "";
    setStatus(`The stream ended without a final message for choice(s) ${indexes}${why}.`, "error");
    showError(`The text of choice(s) ${indexes} is incomplete: the stream ended before their final message${why}.`);
  } else if (error) {
    setStatus("Failed.", "error");
    showError(error.message);
  } else {
    setStatus(`Done: ${run.usage?.completion_tokens ?? 0} token(s) in ${fixed(run.endedAt - run.startedAt)} ms.`, "done");
  }
}

async function generate(event) {
  event.preventDefault();
  let request;
  try {
    request = buildRequest();
  } catch (error) {
    showError(error.message);
    return;
  }
  if (!credential()) {
    showError("Paste an API key or a JWT first.");
    return;
  }
  rememberKey();
  // Generate is disabled while a run streams; a run replaced anyway (a form submitted by
  // script) is aborted, and the guards below keep it off the page and the buttons.
  state.controller?.abort();
  const controller = new AbortController();
  state.controller = controller;
  resetOutput();
  setText("curl", curlCommand(request.model, request.body));
  const run = new Run(request.body.n || 1, Boolean(request.body.logprobs));
  state.run = run;
  const current = () => state.run === run;
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("Waiting for the first token…", "streaming");
  let ended = null;
  try {
    const response = await fetch(`/v2/models/${encodeURIComponent(request.model)}:generate`, {
      method: "POST",
      headers: { ...credentialHeaders(), "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify(request.body),
      signal: controller.signal,
    });
    run.headersAt = performance.now();
    if (current()) showHeaders(response);
    if (!response.ok) {
      throw new Error(await errorText(response));
    }
    run.streaming = true;
    await readStream(response, run);
  } catch (error) {
    ended = error;
  } finally {
    run.endedAt = performance.now();
    if (state.controller === controller) state.controller = null;
    if (current()) {
      showOutcome(run, ended);
      $("generate").disabled = state.models.length === 0;
      $("stop").disabled = true;
      $("append-reply").disabled = !(isChat() && run.choices.length === 1 && run.choices[0].final && !run.failed().length);
      showSummary(run);
    }
  }
}

// ---- chat editing ----------------------------------------------------------

function addMessage(role = "user", content = "") {
  const item = $("message-template").content.firstElementChild.cloneNode(true);
  item.querySelector(".message-role").value = role;
  item.querySelector(".message-content").value = content;
  item.querySelector(".remove-message").addEventListener("click", () => {
    item.remove();
    updateCurl();
  });
  $("messages").append(item);
  return item;
}

function appendReply() {
  const reply = state.run?.choices[0]?.content;
  if (!reply) return;
  addMessage("assistant", reply);
  addMessage("user", "").querySelector(".message-content").focus();
  $("append-reply").disabled = true;
  updateCurl();
}

function switchMode() {
  $("prompt-input").hidden = isChat();
  $("chat-input").hidden = !isChat();
  updateCurl();
}

// ---- wiring ----------------------------------------------------------------

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("connect-form").addEventListener("submit", loadModels);
  $("forget-key").addEventListener("click", forgetKey);
  $("model").addEventListener("change", fillVersions);
  $("version").addEventListener("change", updateCurl);
  $("generate-form").addEventListener("submit", generate);
  $("generate-form").addEventListener("input", updateCurl);
  $("generate-form").addEventListener("change", updateCurl);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("mode-prompt").addEventListener("change", switchMode);
  $("mode-chat").addEventListener("change", switchMode);
  $("add-message").addEventListener("click", () => {
    addMessage("user", "").querySelector(".message-content").focus();
    updateCurl();
  });
  $("append-reply").addEventListener("click", appendReply);
  $("copy-curl").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("curl").textContent);
      setText("models-status", "curl command copied.");
    } catch {
      setText("models-status", "Copying needs clipboard permission: select the command instead.");
    }
  });
  addMessage("system", "You answer in the style of the King James Bible.");
  addMessage("user", "Who made the heavens?");
  updateCurl();
  if (credential()) $("connect-form").requestSubmit();
}

document.addEventListener("DOMContentLoaded", init);
