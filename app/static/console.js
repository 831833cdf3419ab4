// The gateway's web console: plain browser APIs, no build step and nothing fetched from elsewhere,
// so it works offline and from the package as installed.
//
// Deliberate choices:
// - Received messages are shown as they arrive, never de-duplicated: the console shows what the
//   gateway sent, so a duplicate or a gap after a reconnect is visible, not hidden.
// - The last seen message id is kept in localStorage; a reload re-opens the subscription after it.
//   EventSource resends it by itself on reconnect (Last-Event-ID); the WebSocket client
//   resubscribes with `last_event_id` after every reconnect.
// - The token stays in sessionStorage (this tab), not localStorage.
"use strict";

const STORE_KEY = "gateway-console";
const TOKEN_KEY = "gateway-console-token";
const MAX_SHOWN = 500; // messages kept in the list; older ones leave the DOM
const BATCH_CHUNK = 500; // messages per POST /publish
const CHART_POINTS = 120;

const $ = (id) => document.getElementById(id);

// -- saved state ----------------------------------------------------------------------------------

function load() {
  try {
    return JSON.parse(localStorage.getItem(STORE_KEY)) || {};
  } catch {
    return {};
  }
}
const saved = load();
saved.groups = saved.groups || [];
function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(saved));
}

function token() {
  return $("token").value.trim();
}

function list(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

// -- errors ---------------------------------------------------------------------------------------

function notify(message) {
  const box = document.createElement("div");
  box.className = "notice";
  const text = document.createElement("span");
  text.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.setAttribute("aria-label", "dismiss");
  close.onclick = () => box.remove();
  box.append(text, close);
  $("notices").append(box);
  while ($("notices").children.length > 3) $("notices").firstChild.remove();
}

// The API always answers errors as {"error", "detail"}; show those words, nothing raw.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error}: ${body.detail}`;
  } catch {
    // not JSON: a proxy in between answered
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

class ApiError extends Error {}

async function api(method, path, body, extraHeaders = {}) {
  const headers = { ...extraHeaders };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError("the gateway cannot be reached");
  }
  if (!response.ok) throw new ApiError(await errorOf(response));
  return response.json();
}

// Why a stream was refused: EventSource and WebSocket hide the response, so ask again with fetch
// and read only the status and error body.
async function diagnose(path) {
  const controller = new AbortController();
  try {
    const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
    const response = await fetch(path, { headers, signal: controller.signal });
    return response.ok ? null : { status: response.status, text: await errorOf(response) };
  } catch {
    return { status: 0, text: "the gateway cannot be reached" };
  } finally {
    controller.abort();
  }
}

function retryable(problem) {
  return !problem || problem.status === 0 || problem.status === 503 || problem.status >= 500;
}

// -- snippets -------------------------------------------------------------------------------------

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function curlAuth() {
  return token() ? ` \\\n  -H ${shellQuote(`Authorization: Bearer ${token()}`)}` : "";
}

function streamPath(channels, patterns, extra) {
  const params = new URLSearchParams();
  let path;
  if (channels.length === 1 && !patterns.length) {
    path = `/channels/${encodeURIComponent(channels[0])}/events`;
  } else {
    channels.forEach((c) => params.append("channel", c));
    patterns.forEach((p) => params.append("pattern", p));
    path = "/events";
  }
  for (const [key, value] of Object.entries(extra)) if (value) params.set(key, value);
  if (token()) params.set("access_token", token());
  const query = params.toString();
  return query ? `${path}?${query}` : path;
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token() ? `?access_token=${encodeURIComponent(token())}` : "";
  return `${scheme}//${location.host}/ws${query}`;
}

function subscribeSnippet() {
  const channels = list($("sub-channels").value);
  const patterns = list($("sub-patterns").value);
  const lastId = $("sub-last-id").value.trim();
  if ($("sub-transport").value === "ws") {
    const frame = { op: "subscribe", channels, patterns };
    if (lastId) frame.last_event_id = lastId;
    return [
      `const ws = new WebSocket(${JSON.stringify(wsUrl())});`,
      `ws.onopen = () => ws.send(JSON.stringify(${JSON.stringify(frame)}));`,
      `ws.onmessage = (e) => console.log(JSON.parse(e.data)); // {type, channel, id, event, data, ...}`,
    ].join("\n");
  }
  const path = streamPath(channels, patterns, { last_event_id: lastId });
  const lines = [`const events = new EventSource(${JSON.stringify(location.origin + path)});`];
  for (const type of list($("sub-types").value)) {
    lines.push(
      `events.addEventListener(${JSON.stringify(type)}, (e) => console.log(JSON.parse(e.data)));`,
    );
  }
  return lines.join("\n");
}

function publishSnippet() {
  const channel = encodeURIComponent($("pub-channel").value.trim());
  const body = { data: parsedData() ?? null };
  if ($("pub-event").value.trim()) body.event = $("pub-event").value.trim();
  const key = $("pub-key").value;
  return (
    `curl -X POST ${shellQuote(`${location.origin}/channels/${channel}/publish`)}` +
    ` \\\n  -H 'Content-Type: application/json'${curlAuth()}` +
    (key ? ` \\\n  -H ${shellQuote(`Idempotency-Key: ${key}`)}` : "") +
    ` \\\n  -d ${shellQuote(JSON.stringify(body))}`
  );
}

function batchSnippet() {
  const channel = $("pub-channel").value.trim();
  const messages = [1, 2].map((n) => ({ channel, data: { n } }));
  return (
    `curl -X POST ${shellQuote(`${location.origin}/publish`)}` +
    ` \\\n  -H 'Content-Type: application/json'${curlAuth()}` +
    ` \\\n  -d ${shellQuote(JSON.stringify({ messages }))}`
  );
}

function groupSnippet() {
  const channel = $("group-channel").value.trim();
  const group = $("group-name").value.trim();
  const path = streamPath([channel], [], { group, consumer: $("group-consumer").value.trim() });
  const ack = `${location.origin}/channels/${encodeURIComponent(channel)}/groups/${encodeURIComponent(group)}/ack`;
  return [
    `const jobs = new EventSource(${JSON.stringify(location.origin + path)});`,
    `jobs.onmessage = async (e) => {`,
    `  const message = JSON.parse(e.data); // message.deliveries counts redeliveries`,
    `  await fetch(${JSON.stringify(ack)}, {method: "POST",`,
    `    headers: {"Content-Type": "application/json"}, body: JSON.stringify({ids: [message.id]})});`,
    `};`,
  ].join("\n");
}

function refreshSnippets() {
  $("sub-snippet").textContent = subscribeSnippet();
  $("pub-snippet").textContent = publishSnippet();
  $("batch-snippet").textContent = batchSnippet();
  $("group-snippet").textContent = groupSnippet();
}

async function copy(button) {
  const text = $(button.dataset.copy).textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    // no clipboard access (plain http on another host): select it for Ctrl+C instead
    getSelection().selectAllChildren($(button.dataset.copy));
    button.textContent = "Selected";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

// -- the message list -----------------------------------------------------------------------------

let received = 0;
let paused = false;
let held = [];

function timeOf(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString([], { hour12: false }) +
    "." + String(date.getMilliseconds()).padStart(3, "0");
}

function messageItem(envelope) {
  const item = document.createElement("li");
  item.className = "message";
  item.dataset.id = envelope.id;
  item.dataset.channel = envelope.channel;
  const meta = document.createElement("div");
  meta.className = "meta";
  const fields = [
    ["channel", envelope.channel],
    ["event", envelope.event],
    ["id", envelope.id],
    ["time", timeOf(envelope.published_at)],
  ];
  if (envelope.deliveries) fields.push(["deliveries", `delivery ${envelope.deliveries}`]);
  for (const [name, value] of fields) {
    const span = document.createElement("span");
    span.className = name;
    span.textContent = value;
    if (name === "time") span.title = envelope.published_at;
    meta.append(span);
  }
  const data = document.createElement("pre");
  data.textContent = JSON.stringify(envelope.data, null, 2);
  item.append(meta, data);
  return item;
}

function show(item) {
  const list = $("messages");
  list.prepend(item);
  while (list.children.length > MAX_SHOWN) list.lastChild.remove();
}

function onMessage(envelope) {
  received += 1;
  $("msg-count").textContent = String(received);
  subscription.lastId = envelope.id;
  saved.lastId = envelope.id;
  save();
  $("msg-last").textContent = `last id ${envelope.id}`;
  const item = messageItem(envelope);
  if (paused) {
    held.push(item);
    $("msg-held").textContent = `${held.length} held while paused`;
  } else {
    show(item);
  }
}

function onGap(gap) {
  const item = document.createElement("li");
  item.className = "gap";
  item.textContent = gap.reason === "dropped"
    ? `${gap.dropped} message(s) dropped: this subscriber fell behind`
    : `gap (${gap.reason}): messages after ${gap.last_event_id || "that id"} could not be replayed`;
  show(item);
}

function togglePause() {
  paused = !paused;
  $("msg-pause").textContent = paused ? "Resume" : "Pause";
  $("msg-pause").setAttribute("aria-pressed", String(paused));
  if (!paused) {
    held.forEach(show);
    held = [];
    $("msg-held").textContent = "";
  }
}

function clearMessages() {
  $("messages").replaceChildren();
  held = [];
  received = 0;
  $("msg-count").textContent = "0";
  $("msg-held").textContent = "";
}

// -- subscribing ----------------------------------------------------------------------------------

const subscription = { active: false, lastId: null, close: () => {} };

function setStatus(text, kind = "") {
  $("sub-status").textContent = text;
  $("sub-status").className = `status ${kind}`;
}

// One EventSource; the browser reconnects it by itself and resends Last-Event-ID. Only a refused
// stream (EventSource gives up) is retried here, from the last id seen.
function openEventSource(path, types, handlers) {
  let source = null;
  let timer = null;
  let closed = false;
  const connect = (url) => {
    source = new EventSource(url);
    source.onopen = () => handlers.status("live", "ok");
    for (const type of new Set(["message", ...types])) {
      source.addEventListener(type, (e) => handlers.message(JSON.parse(e.data)));
    }
    source.addEventListener("gap", (e) => handlers.gap(JSON.parse(e.data)));
    source.onerror = async (e) => {
      if (e.data) {
        // the gateway's own `event: error` (this subscriber was disconnected)
        const body = JSON.parse(e.data);
        notify(`${body.error}: ${body.detail}`);
        return;
      }
      if (source.readyState === EventSource.CONNECTING) {
        handlers.status("reconnecting…", "bad");
        return;
      }
      const problem = await diagnose(url);
      if (closed) return;
      if (!retryable(problem)) {
        handlers.status("refused", "bad");
        notify(problem.text);
        handlers.refused();
        return;
      }
      handlers.status(`retrying: ${problem ? problem.text : "stream ended"}`, "bad");
      timer = setTimeout(() => connect(path(handlers.lastId())), 2000);
    };
  };
  connect(path(handlers.lastId()));
  return {
    addType(type) {
      source.addEventListener(type, (e) => handlers.message(JSON.parse(e.data)));
    },
    close() {
      closed = true;
      clearTimeout(timer);
      source.close();
    },
  };
}

// A WebSocket that reconnects with backoff and resubscribes after the last id it saw.
function openWebSocket(frameFor, handlers) {
  let socket = null;
  let timer = null;
  let closed = false;
  let delay = 500;
  let ref = 0;
  const connect = () => {
    socket = new WebSocket(wsUrl());
    socket.onopen = () => {
      delay = 500;
      ref += 1;
      socket.send(JSON.stringify({ ...frameFor(handlers.lastId()), ref }));
    };
    socket.onmessage = (e) => {
      const frame = JSON.parse(e.data);
      if (frame.type === "message") handlers.message(frame);
      else if (frame.type === "gap") handlers.gap(frame);
      else if (frame.type === "ok") handlers.status("live", "ok");
      else if (frame.type === "error") {
        notify(`${frame.error}: ${frame.detail}`);
        if (frame.ref === ref && frame.status < 500) {
          closed = true; // the subscription itself was refused: retrying cannot help
          handlers.status("refused", "bad");
          handlers.refused();
          socket.close();
        }
      }
    };
    socket.onclose = (e) => {
      if (closed) return;
      if (e.code === 1008) {
        // refused by policy (a missing, bad or expired token; a channel not allowed): the error
        // frame before the close said why, and reconnecting would only be refused again
        handlers.status("refused", "bad");
        handlers.refused();
        return;
      }
      handlers.status(`reconnecting… (closed ${e.code}${e.reason ? `: ${e.reason}` : ""})`, "bad");
      timer = setTimeout(connect, delay);
      delay = Math.min(delay * 2, 5000);
    };
  };
  connect();
  return {
    addType() {},
    close() {
      closed = true;
      clearTimeout(timer);
      socket.close();
    },
  };
}

function subscribe(resuming) {
  subscription.close();
  const transport = $("sub-transport").value;
  const channels = list($("sub-channels").value);
  const patterns = list($("sub-patterns").value);
  if (!channels.length && !patterns.length) {
    notify("name at least one channel or pattern");
    return;
  }
  subscription.lastId = $("sub-last-id").value.trim() || null;
  const handlers = {
    message: onMessage,
    gap: onGap,
    status: setStatus,
    lastId: () => subscription.lastId,
    refused: stop,
  };
  const stream = transport === "ws"
    ? openWebSocket((lastId) => {
      const frame = { op: "subscribe", channels, patterns };
      if (lastId) frame.last_event_id = lastId;
      return frame;
    }, handlers)
    : openEventSource(
      (lastId) => streamPath(channels, patterns, { last_event_id: lastId }),
      list($("sub-types").value),
      handlers,
    );
  subscription.active = true;
  subscription.stream = stream;
  subscription.close = () => stream.close();
  saved.subscription = { transport, channels, patterns, types: $("sub-types").value, active: true };
  save();
  setStatus(resuming ? `resuming after ${subscription.lastId}…` : "connecting…");
  $("sub-start").textContent = "Resubscribe";
  $("sub-stop").disabled = false;
}

function stop() {
  subscription.close();
  subscription.close = () => {};
  subscription.active = false;
  if (saved.subscription) saved.subscription.active = false;
  save();
  $("sub-start").textContent = "Subscribe";
  $("sub-stop").disabled = true;
  if (!$("sub-status").classList.contains("bad")) setStatus("not subscribed");
}

// -- publishing -----------------------------------------------------------------------------------

function parsedData() {
  try {
    return JSON.parse($("pub-data").value);
  } catch {
    return undefined;
  }
}

function validateData() {
  const ok = parsedData() !== undefined;
  $("pub-data").setAttribute("aria-invalid", String(!ok));
  $("pub-send").disabled = !ok;
  $("pub-status").textContent = ok ? "" : "data is not valid JSON";
  $("pub-status").className = ok ? "status" : "status bad";
  return ok;
}

async function publish(event) {
  event.preventDefault();
  if (!validateData()) return;
  const channel = $("pub-channel").value.trim();
  const type = $("pub-event").value.trim();
  const body = { data: parsedData() };
  if (type) {
    body.event = type;
    subscription.stream?.addType(type); // so an open EventSource shows what this page sends
  }
  try {
    const key = $("pub-key").value;
    const headers = key ? { "Idempotency-Key": key } : {};
    const path = `/channels/${encodeURIComponent(channel)}/publish`;
    const reply = await api("POST", path, body, headers);
    $("pub-status").textContent = reply.replayed
      ? `replayed ${reply.id}: the key was seen, nothing published`
      : `published ${reply.id}`;
    $("pub-status").className = "status ok";
  } catch (error) {
    $("pub-status").textContent = "failed";
    $("pub-status").className = "status bad";
    notify(error.message);
  }
}

async function publishBatch(event) {
  event.preventDefault();
  const channel = $("pub-channel").value.trim();
  const total = Number($("batch-count").value);
  if (!Number.isInteger(total) || total < 1) {
    notify("the number of test messages must be a whole number of at least 1");
    return;
  }
  const progress = $("batch-progress");
  progress.max = total;
  progress.value = 0;
  $("batch-send").disabled = true;
  const started = performance.now();
  try {
    for (let first = 0; first < total; first += BATCH_CHUNK) {
      const messages = [];
      for (let n = first; n < Math.min(first + BATCH_CHUNK, total); n += 1) {
        messages.push({ channel, data: { test: n + 1, of: total } });
      }
      await api("POST", "/publish", { messages });
      progress.value = first + messages.length;
      $("batch-status").textContent = `${progress.value}/${total}`;
    }
    const seconds = (performance.now() - started) / 1000;
    $("batch-status").textContent = `${total} published in ${seconds.toFixed(2)} s`;
    $("batch-status").className = "status ok";
  } catch (error) {
    $("batch-status").textContent = `stopped at ${progress.value}/${total}`;
    $("batch-status").className = "status bad";
    notify(error.message);
  } finally {
    $("batch-send").disabled = false;
  }
}

// -- gateway panels -------------------------------------------------------------------------------

async function readiness() {
  const pill = $("ready");
  try {
    const ready = await api("GET", "/readyz");
    pill.textContent = `ready · ${ready.layer}`;
    pill.className = "pill ok";
    $("layer").textContent = ready.layer;
    const chips = Object.entries(ready.capabilities).map(([name, has]) => {
      const chip = document.createElement("span");
      chip.className = `chip ${has ? "yes" : "no"}`;
      chip.textContent = name.replace("_", " ");
      return chip;
    });
    $("capabilities").replaceChildren(...chips);
  } catch (error) {
    pill.textContent = "not ready";
    pill.className = "pill bad";
    pill.title = error.message;
  }
}

const samples = []; // {published, delivered} per second
let previous = null;

async function statistics() {
  let stats;
  try {
    stats = await api("GET", "/stats");
  } catch {
    previous = null; // a restarted process starts its totals again
    return;
  }
  const now = performance.now();
  const delivered = stats.delivered.sse + stats.delivered.ws;
  $("subscribers").textContent = `${stats.subscribers.sse} SSE · ${stats.subscribers.ws} WebSocket`;
  if (previous && stats.published >= previous.published) {
    const seconds = (now - previous.at) / 1000;
    samples.push({
      published: (stats.published - previous.published) / seconds,
      delivered: (delivered - previous.delivered) / seconds,
    });
    while (samples.length > CHART_POINTS) samples.shift();
    const last = samples[samples.length - 1];
    $("rates").textContent =
      `${last.published.toFixed(1)} published/s · ${last.delivered.toFixed(1)} delivered/s`;
    drawChart();
  }
  previous = { at: now, published: stats.published, delivered };
  serverGroups = stats.groups;
  renderGroups();
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  const style = getComputedStyle(document.documentElement);
  const top = Math.max(1, ...samples.map((s) => Math.max(s.published, s.delivered)));
  const x = (i) => width - (samples.length - 1 - i) * (width / (CHART_POINTS - 1));
  const y = (v) => height - 14 - (v / top) * (height - 24);
  ctx.fillStyle = style.getPropertyValue("--muted");
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(`${Math.round(top)}/s`, 4, 12);
  ctx.fillText("2 min", 4, height - 3);
  for (const [key, color] of [["published", "--published"], ["delivered", "--delivered"]]) {
    ctx.strokeStyle = style.getPropertyValue(color);
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    samples.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s[key])) : ctx.moveTo(x(i), y(s[key]))));
    ctx.stroke();
  }
}

// -- consumer groups ------------------------------------------------------------------------------

let serverGroups = []; // groups with a consumer on this gateway process (GET /stats)
const joined = new Map(); // "channel/group" -> {channel, group, consumer, stream, pending: Map}
const pendingCounts = new Map();
let selected = null;

const keyOf = (channel, group) => `${channel}/${group}`;

function join(channel, group, consumer) {
  const key = keyOf(channel, group);
  if (joined.has(key)) return;
  const entry = { channel, group, consumer, live: false, pending: new Map() };
  joined.set(key, entry);
  entry.stream = openEventSource(
    () => streamPath([channel], [], { group, consumer }),
    list($("sub-types").value),
    {
      message: (envelope) => {
        entry.pending.set(envelope.id, envelope);
        if (selected === key) renderGroupView();
        groupInfo(channel, group);
      },
      gap: () => {},
      status: (text, kind) => {
        // the group exists once the stream is open: asking about it before would be a 404
        entry.live = kind === "ok";
        if (entry.live) renderGroupView();
      },
      lastId: () => null,
      refused: () => leave(key),
    },
  );
  if (!saved.groups.some((g) => keyOf(g.channel, g.group) === key)) {
    saved.groups.push({ channel, group, consumer });
    save();
  }
  selected = key;
  renderGroups();
  renderGroupView();
}

function leave(key) {
  const entry = joined.get(key);
  if (entry) entry.stream.close();
  joined.delete(key);
  saved.groups = saved.groups.filter((g) => keyOf(g.channel, g.group) !== key);
  save();
  if (selected === key) selected = null;
  renderGroups();
  renderGroupView();
}

function knownGroups() {
  const groups = new Map();
  for (const g of [...serverGroups, ...joined.values()]) groups.set(keyOf(g.channel, g.group), g);
  return [...groups.entries()].sort();
}

function renderGroups() {
  const rows = knownGroups().map(([key, g]) => {
    const row = document.createElement("tr");
    row.dataset.group = key;
    const here = serverGroups.find((s) => keyOf(s.channel, s.group) === key);
    const cells = [g.channel, g.group, pendingCounts.get(key) ?? "…", here ? here.consumers : 0];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.append(cell);
    }
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "View";
    open.onclick = () => {
      selected = key;
      renderGroupView();
    };
    const cell = document.createElement("td");
    cell.append(open);
    row.append(cell);
    return row;
  });
  $("group-table").tBodies[0].replaceChildren(...rows);
}

async function groupInfo(channel, group) {
  const key = keyOf(channel, group);
  try {
    const info = await api(
      "GET",
      `/channels/${encodeURIComponent(channel)}/groups/${encodeURIComponent(group)}`,
    );
    pendingCounts.set(key, info.pending);
    if (selected === key) {
      const oldest = info.oldest_unacked
        ? `; oldest unacked ${info.oldest_unacked.id} (${Math.round(info.oldest_unacked.age_seconds)} s)`
        : "";
      const held = (c) => (c.prefetch === null ? `${c.in_flight} in flight` : `${c.in_flight}/${c.prefetch} in flight`);
      const consumers = info.consumers.map((c) => `${c.name} (${held(c)})`).join(", ") || "none";
      $("group-info").textContent = `${info.pending} pending; consumers: ${consumers}${oldest}`;
    }
  } catch (error) {
    pendingCounts.set(key, "?");
    if (selected === key) $("group-info").textContent = error.message;
  }
  renderGroups();
}

function renderGroupView() {
  const view = $("group-view");
  const entry = selected && joined.get(selected);
  view.hidden = !selected;
  if (!selected) return;
  const [channel, group] = selected.split("/");
  $("group-title").textContent = `${group} on ${channel}` + (entry ? ` (consumer ${entry.consumer})` : "");
  $("group-leave").hidden = !entry;
  const items = entry
    ? [...entry.pending.values()].map((envelope) => {
      const item = document.createElement("li");
      const body = messageItem(envelope);
      const wrapper = document.createElement("div");
      wrapper.append(...body.childNodes);
      const button = (label, settle) => {
        const element = document.createElement("button");
        element.type = "button";
        element.textContent = label;
        element.onclick = () => settle(channel, group, [envelope.id]);
        return element;
      };
      item.dataset.id = envelope.id;
      item.append(wrapper, button("Ack", ack), button("Nack", nack));
      return item;
    })
    : [];
  $("group-pending").replaceChildren(...items);
  $("group-ack-all").hidden = !items.length;
  $("group-nack-all").hidden = !items.length;
  if (!entry || entry.live) groupInfo(channel, group);
}

const ack = (channel, group, ids) => settle(channel, group, "ack", { ids });

// Nacked messages come back (now or after the delay) with their delivery counted up.
const nack = (channel, group, ids) =>
  settle(channel, group, "nack", { ids, delay_seconds: Number($("nack-delay").value) || 0 });

async function settle(channel, group, how, body) {
  const entry = joined.get(keyOf(channel, group));
  const held = new Map(body.ids.map((id) => [id, entry?.pending.get(id)]));
  try {
    const reply = await api(
      "POST",
      `/channels/${encodeURIComponent(channel)}/groups/${encodeURIComponent(group)}/${how}`,
      body,
    );
    // a nacked message may be delivered again before the reply: that delivery stays shown
    for (const [id, envelope] of held) {
      if (entry && entry.pending.get(id) === envelope) entry.pending.delete(id);
    }
    if (reply.unknown.length) notify(`not pending in ${group}: ${reply.unknown.join(", ")}`);
  } catch (error) {
    notify(error.message);
  }
  renderGroupView();
}

// -- wiring ---------------------------------------------------------------------------------------

// -- presence -------------------------------------------------------------------------------------

// Watching a channel's presence subscribes to it with `?presence=true` (so this page counts too)
// and asks GET /channels/{c}/presence again at every join and leave.
let presenceSource = null;

function watchPresence(channel) {
  if (presenceSource) presenceSource.close();
  $("presence-events").replaceChildren();
  presenceSource = new EventSource(streamPath([channel], [], { presence: "true" }));
  presenceSource.onopen = () => {
    $("presence-status").textContent = `watching ${channel}`;
    showPresence(channel);
  };
  presenceSource.onerror = () => {
    $("presence-status").textContent = "reconnecting…";
  };
  for (const kind of ["join", "leave"]) {
    presenceSource.addEventListener(kind, (e) => {
      const change = JSON.parse(e.data);
      const item = document.createElement("li");
      item.className = kind;
      item.dataset.client = change.client_id;
      item.textContent = `${kind} ${change.client_id} (${change.user ?? "anonymous"}, ` +
        `${change.transport})`;
      const events = $("presence-events");
      events.prepend(item);
      while (events.children.length > MAX_SHOWN) events.lastChild.remove();
      showPresence(channel);
    });
  }
}

async function showPresence(channel) {
  let presence;
  try {
    presence = await api("GET", `/channels/${encodeURIComponent(channel)}/presence`);
  } catch (error) {
    notify(error.message);
    return;
  }
  $("presence-count").textContent = String(presence.subscribers);
  $("presence-clients").replaceChildren(...presence.clients.map((client) => {
    const item = document.createElement("li");
    item.dataset.client = client.client_id;
    item.textContent = `${client.client_id} ${client.user ?? "anonymous"} ${client.transport} ` +
      `since ${timeOf(client.connected_at)}`;
    return item;
  }));
}

function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("input", () => {
    sessionStorage.setItem(TOKEN_KEY, token());
    refreshSnippets();
  });
  for (const field of document.querySelectorAll("input, select, textarea")) {
    field.addEventListener("input", refreshSnippets);
  }
  $("pub-data").addEventListener("input", validateData);
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copy(button));
  }
  $("sub-form").addEventListener("submit", (event) => {
    event.preventDefault();
    subscribe(false);
  });
  $("sub-stop").addEventListener("click", stop);
  $("pub-form").addEventListener("submit", publish);
  $("batch-form").addEventListener("submit", publishBatch);
  $("msg-pause").addEventListener("click", togglePause);
  $("msg-clear").addEventListener("click", clearMessages);
  $("group-form").addEventListener("submit", (event) => {
    event.preventDefault();
    join($("group-channel").value.trim(), $("group-name").value.trim(),
      $("group-consumer").value.trim());
  });
  $("group-leave").addEventListener("click", () => leave(selected));
  $("group-ack-all").addEventListener("click", () => {
    const entry = joined.get(selected);
    ack(entry.channel, entry.group, [...entry.pending.keys()]);
  });
  $("presence-form").addEventListener("submit", (event) => {
    event.preventDefault();
    watchPresence($("presence-channel").value.trim());
  });
  $("auth-form").addEventListener("submit", (event) => event.preventDefault());
  $("group-nack-all").addEventListener("click", () => {
    const entry = joined.get(selected);
    nack(entry.channel, entry.group, [...entry.pending.keys()]);
  });
  $("group-nack").addEventListener("click", () => {
    const [channel, group] = selected.split("/");
    const ids = list($("ack-ids").value);
    if (ids.length) nack(channel, group, ids);
    $("ack-ids").value = "";
  });
  $("ack-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const [channel, group] = selected.split("/");
    const ids = list($("ack-ids").value);
    if (ids.length) ack(channel, group, ids);
    $("ack-ids").value = "";
  });

  // a reload picks up where the page left off
  const previousSub = saved.subscription;
  if (previousSub) {
    $("sub-transport").value = previousSub.transport;
    $("sub-channels").value = previousSub.channels.join(", ");
    $("sub-patterns").value = previousSub.patterns.join(", ");
    $("sub-types").value = previousSub.types || "message";
  }
  if (saved.lastId) {
    $("msg-last").textContent = `last id ${saved.lastId}`;
  }
  if (previousSub && previousSub.active) {
    $("sub-last-id").value = saved.lastId || "";
    subscribe(Boolean(saved.lastId));
    $("sub-last-id").value = "";
  }
  for (const g of saved.groups) join(g.channel, g.group, g.consumer);
  refreshSnippets();
  readiness();
  statistics();
  setInterval(readiness, 5000);
  setInterval(statistics, 1000);
  setInterval(() => {
    for (const [key, g] of knownGroups()) {
      if (joined.get(key)?.live !== false) groupInfo(g.channel, g.group);
    }
  }, 3000);
}

start();
