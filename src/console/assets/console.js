// The channelgate console: draws what /console/api/ answers, publishes through it, and
// runs a test WebSocket of its own. Plain JavaScript, no dependencies. Everything shown
// is set as text (never as HTML), since group names and payloads come from outside.
"use strict";

const POLL_MS = 2000;
const MAX_FRAMES = 300;
const SERIES = [
  ["deliveries", "deliveries"],
  ["publishes", "publishes"],
  ["connects", "connects"],
  ["slow_consumer_closes", "slow-consumer closes", true],
  ["replays", "replays"],
  ["authorizer_calls", "authorizer calls"],
  ["authorizer_failures", "authorizer failures", true],
];

const $ = (id) => document.getElementById(id);
let setup = null;
let seenEvents = new Set();
let pollTimer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch("api/" + path, options);
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { error: response.statusText }; }
  if (response.status === 401) { location.reload(); }
  if (!response.ok) throw new Error(answer.error || response.statusText || "request failed");
  return answer;
}

function uptime(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
  const m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function rate(value) {
  if (value >= 1000) return (value / 1000).toFixed(1) + "k";
  if (value >= 10) return value.toFixed(0);
  return value.toFixed(value ? 1 : 0);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

// A token is never shown whole.
function cut(token) {
  if (token === "anonymous") return token;
  return `${token.slice(0, 10)}…${token.length} chars`;
}

// ---------------------------------------------------------------- the node's picture

function showSetup() {
  const about = $("about");
  about.replaceChildren();
  const badge = (text, cls) => about.append(el("span", { class: "badge " + (cls || "") }, text));
  if (setup.dev) badge("DEV MODE", "dev");
  badge(setup.node_id);
  badge("v" + setup.version);
  badge("bus: " + setup.bus);
  badge("history " + (setup.history ? "on" : "off"));
  badge("presence " + (setup.presence ? "on" : "off"));
  badge("authorizer: " + setup.authorizer);
  badge(setup.api_key ? "API key set" : "gRPC API open (no API key)");
  $("logout").hidden = !setup.login;
  $("presence-off").hidden = setup.presence;
  for (const cell of document.querySelectorAll(".presence-only")) cell.hidden = !setup.presence;
  $("ts-mint").hidden = !setup.mints_tokens;
  $("ts-paste-label").hidden = setup.mints_tokens;
  $("ts-token-note").textContent = setup.mints_tokens
    ? "Under --dev the console signs a 15-minute token for the user id."
    : "Paste an access token of that user (the console mints none outside --dev).";
  if (setup.origins_restricted) {
    $("ts-token-note").textContent += " --allowed-origins must list this page's origin.";
  }
  const pages = $("ts-page");
  pages.replaceChildren(...setup.pages.map((p) => el("option", { value: p.name }, p.name)));
  showParams();
  const charts = $("charts");
  charts.replaceChildren(...SERIES.map(([key, title, bad]) => {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 200 46");
    svg.setAttribute("preserveAspectRatio", "none");
    for (const cls of ["area", "line"]) {
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      path.setAttribute("class", cls);
      svg.append(path);
    }
    return el("div", { class: "chart" + (bad ? " bad" : ""), "data-series": key },
      el("div", { class: "head" }, el("span", {}, title), el("span", { class: "value" }, "–")),
      svg,
      el("div", { class: "peak" }, ""));
  }));
}

function drawChart(chart, points) {
  const [area, line] = chart.querySelectorAll("path");
  const values = points.length >= 2 ? points : [0, ...points, 0].slice(-2);
  const peak = Math.max(...values);
  const top = peak > 0 ? peak : 1;
  const step = 200 / (values.length - 1);
  const coords = values.map((v, i) => `${(i * step).toFixed(1)},${(44 - (v / top) * 40).toFixed(1)}`);
  line.setAttribute("d", "M" + coords.join("L"));
  area.setAttribute("d", `M0,46L${coords.join("L")}L200,46Z`);
  const last = points.length ? points[points.length - 1] : 0;
  chart.querySelector(".value").textContent = rate(last) + "/s";
  chart.querySelector(".peak").textContent = points.length
    ? `peak ${rate(peak)}/s over ${Math.round(points.length * setup.rate_interval_seconds)} s`
    : "collecting…";
}

function showNodes(state) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren(...state.nodes.map((n) => {
    const row = el("tr", { "data-node": n.node_id, class: n.node_id === setup.node_id ? "self" : "" },
      el("td", { class: "mono" }, n.node_id),
      el("td", {}, n.version),
      el("td", { class: "n connections" }, n.connections),
      el("td", { class: "n users" }, n.users),
      el("td", { class: "n groups" }, n.groups),
      el("td", { class: "n subscriptions" }, n.subscriptions),
      el("td", { class: "n presence-only" }, n.presence_members),
      el("td", { class: "n uptime" }, uptime(n.uptime_seconds)));
    row.querySelector(".presence-only").hidden = !setup.presence;
    return row;
  }));
  const total = state.nodes.reduce((sum, n) => sum + n.connections, 0);
  $("nodes-note").textContent = `${state.nodes.length} answering, ${total} connections in all`;
  const missing = $("nodes-missing");
  const trouble = state.bus_error
    ? "The bus is unavailable: " + state.bus_error
    : state.missing.length ? "Not answering: " + state.missing.join(", ") : "";
  missing.textContent = trouble;
  missing.hidden = !trouble;
}

function showGroups(state) {
  const most = Math.max(1, ...state.groups.map((g) => g.subscribers));
  $("groups").tBodies[0].replaceChildren(...state.groups.map((g) => {
    const bar = el("div", { class: "bar" }, el("span"));
    bar.firstChild.style.width = `${(100 * g.subscribers) / most}%`;
    return el("tr", {}, el("td", { class: "mono" }, g.group), el("td", { class: "n" }, g.subscribers),
      el("td", { class: "barcell" }, bar));
  }));
  $("groups-empty").hidden = state.groups.length > 0;
}

function showPresence(state) {
  const spaces = state.presence || [];
  $("presence").tBodies[0].replaceChildren(...spaces.map((s) =>
    el("tr", {}, el("td", { class: "mono" }, s.space), el("td", { class: "n" }, s.members),
      el("td", { class: "n" }, s.here))));
  $("presence-empty").hidden = !setup.presence || spaces.length > 0;
}

function showRecent(state) {
  const first = seenEvents.size === 0;
  const rows = state.recent.map((p) => {
    const key = `${p.at_ms}/${p.event_id}/${p.target}`;
    const fresh = !first && !seenEvents.has(key);
    seenEvents.add(key);
    return el("tr", { class: fresh ? "fresh" : "", "data-event-id": p.event_id },
      el("td", {}, clock(p.at_ms)),
      el("td", { class: "n id" }, p.event_id || "–"),
      el("td", { class: "mono target" }, p.target),
      el("td", { class: "mono type" }, p.type),
      el("td", { class: "n" }, p.bytes),
      el("td", {}, p.via),
      el("td", { class: "payload", title: p.excerpt }, p.excerpt));
  });
  $("recent").tBodies[0].replaceChildren(...rows);
  $("recent-empty").hidden = rows.length > 0;
}

async function refresh() {
  clearTimeout(pollTimer);
  try {
    const state = await api("state");
    showNodes(state);
    for (const chart of document.querySelectorAll(".chart")) {
      drawChart(chart, state.rates.series[chart.dataset.series] || []);
    }
    showGroups(state);
    showPresence(state);
    showRecent(state);
    $("live").className = "dot ok";
    $("status").textContent = "live · " + clock(Date.now());
  } catch (error) {
    $("live").className = "dot bad";
    $("status").textContent = "cannot reach the node: " + error.message;
  }
  // Nothing is asked while the tab is hidden.
  if (!document.hidden) pollTimer = setTimeout(refresh, POLL_MS);
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });

// ---------------------------------------------------------------- publish

function checkPayload() {
  const text = $("pub-payload").value;
  const hint = $("pub-json");
  let problem = null;
  let parsed = null;
  try {
    parsed = JSON.parse(text);
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) problem = "must be a JSON object";
    else if (typeof parsed.type !== "string") problem = "needs a string \"type\"";
  } catch (error) {
    problem = error.message;
  }
  const bytes = new TextEncoder().encode(text).length;
  if (!problem && setup && bytes > setup.max_payload_bytes) {
    problem = `is ${bytes} bytes; the limit is ${setup.max_payload_bytes}`;
  }
  hint.textContent = problem ? "payload " + problem : `valid: type "${parsed.type}", ${bytes} bytes`;
  hint.className = "hint " + (problem ? "bad" : "good");
  $("pub-payload").classList.toggle("invalid", !!problem);
  $("pub-send").disabled = !!problem;
  return problem ? null : parsed;
}

function userIds(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  const ids = parts.map(Number);
  if (!parts.length || ids.some((id) => !Number.isSafeInteger(id) || id < 0)) return null;
  return ids;
}

function showTarget() {
  const target = $("pub-target").value;
  $("pub-group-label").hidden = target !== "group";
  $("pub-users-label").hidden = target !== "users";
}

async function publish(event) {
  event.preventDefault();
  const result = $("pub-result");
  if (!checkPayload()) return;
  const target = $("pub-target").value;
  const form = { target, payload: $("pub-payload").value, skip_history: $("pub-skip").checked };
  if (target === "group") form.group = $("pub-group").value.trim();
  if (target === "users") {
    form.user_ids = userIds($("pub-users").value);
    if (!form.user_ids) {
      result.textContent = "user ids: a list of non-negative integers";
      result.className = "result bad";
      return;
    }
  }
  $("pub-send").disabled = true;
  try {
    const answer = await api("publish", form);
    result.textContent = answer.event_id
      ? `published: event id ${answer.event_id}`
      : "published (not recorded in the history: event id 0)";
    result.className = "result good";
    result.dataset.eventId = answer.event_id;
    refresh();
  } catch (error) {
    result.textContent = "refused: " + error.message;
    result.className = "result bad";
  } finally {
    checkPayload();
  }
}

// ---------------------------------------------------------------- test socket

let socket = null;
let token = null;

function frame(kind, text) {
  const list = $("ts-frames");
  const item = el("li", { class: kind }, el("span", { class: "t" }, clock(Date.now())), text);
  list.append(item);
  while (list.children.length > MAX_FRAMES) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

function showParams() {
  const page = setup.pages.find((p) => p.name === $("ts-page").value);
  const params = (page ? page.parameters : []).map((p) => {
    const input = el("input", { "data-param": p.name, "data-kind": p.kind, placeholder: `${p.name} (${p.kind})`, spellcheck: "false" });
    if (p.kind === "id") input.value = "1";
    return input;
  });
  $("ts-params").replaceChildren(...params);
}

function pageFrame(key) {
  const message = { [key]: $("ts-page").value };
  for (const input of $("ts-params").querySelectorAll("input")) {
    const value = input.value.trim();
    const kind = input.dataset.kind;
    if (value === "") message[input.dataset.param] = kind.startsWith("optional") ? null : "";
    else if ((kind === "id" || kind === "optional_id") && /^\d+$/.test(value)) message[input.dataset.param] = Number(value);
    else message[input.dataset.param] = value;
  }
  return message;
}

function send(message) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  const text = JSON.stringify(message);
  socket.send(text);
  frame("out", text);
}

function connected(open) {
  for (const id of ["ts-subscribe", "ts-unsubscribe", "ts-replay", "ts-ping", "ts-close"]) $(id).disabled = !open;
  $("ts-connect").disabled = open;
}

async function tokenFor(userId) {
  if (!setup.mints_tokens) {
    const pasted = $("ts-paste").value.trim();
    if (!pasted) throw new Error("paste an access token first");
    return pasted;
  }
  const answer = await api("token", { user_id: userId });
  return answer.token;
}

async function connect() {
  const status = $("ts-status");
  const userId = Number($("ts-user").value);
  if (!Number.isSafeInteger(userId) || userId < 0) {
    status.textContent = "user id: a non-negative integer (0: anonymous)";
    return;
  }
  try {
    token = await tokenFor(userId);
  } catch (error) {
    status.textContent = "no token: " + error.message;
    return;
  }
  $("ts-token-note").textContent = `token ${cut(token)}`;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/core/?jwt_token=${encodeURIComponent(token)}`);
  status.textContent = "connecting…";
  $("ts-connect").disabled = true;
  socket.onopen = () => { status.textContent = `open as user ${userId}`; connected(true); };
  socket.onmessage = (message) => {
    frame("in", message.data);
    try {
      const data = JSON.parse(message.data);
      const last = $("ts-last-seen");
      if (Number.isSafeInteger(data._event_id) && data._event_id > Number(last.value)) last.value = data._event_id;
      if (data.type === "authentication") {
        status.textContent = data.success ? `open as user ${userId}, web_socket_id ${data.web_socket_id}` : "authentication failed";
      }
    } catch (e) { /* not JSON: shown as it came */ }
  };
  socket.onclose = (close) => {
    frame("note", `closed: code ${close.code}${close.reason ? ", " + close.reason : ""}`);
    status.textContent = "not connected";
    socket = null;
    connected(false);
  };
  socket.onerror = () => frame("note", "WebSocket error (see the browser console)");
}

// ---------------------------------------------------------------- start

async function start() {
  try {
    setup = await api("setup");
  } catch (error) {
    $("status").textContent = "cannot load the console: " + error.message;
    return;
  }
  showSetup();
  checkPayload();
  $("pub-payload").addEventListener("input", checkPayload);
  $("pub-target").addEventListener("change", showTarget);
  $("pub").addEventListener("submit", publish);
  $("pub-format").addEventListener("click", () => {
    const parsed = checkPayload();
    if (parsed) { $("pub-payload").value = JSON.stringify(parsed, null, 2); checkPayload(); }
  });
  $("ts-page").addEventListener("change", showParams);
  $("ts-connect").addEventListener("click", connect);
  $("ts-mint").addEventListener("click", async () => {
    try {
      token = await tokenFor(Number($("ts-user").value));
      $("ts-token-note").textContent = `token ${cut(token)} (valid 15 minutes)`;
    } catch (error) { $("ts-token-note").textContent = "no token: " + error.message; }
  });
  $("ts-close").addEventListener("click", () => socket && socket.close(1000));
  $("ts-subscribe").addEventListener("click", () => send(pageFrame("page")));
  $("ts-unsubscribe").addEventListener("click", () => send(pageFrame("remove_page")));
  $("ts-ping").addEventListener("click", () => send({ type: "ping" }));
  $("ts-replay").addEventListener("click", () => send({
    type: "replay_events", last_seen_id: Number($("ts-last-seen").value), supports_retry: true,
  }));
  refresh();
}

start();
