// Demo client for sse_server: EventSource for subscribing, fetch() for publishing.
// Plain JavaScript, no dependencies, works offline and under a strict CSP.
"use strict";

const $ = (id) => document.getElementById(id);
let source = null;
let received = 0;

// Named event types the page listens for besides the default "message".
// EventSource only reports a named event to a listener registered for its name,
// so the page also learns names from what it publishes (see publish below).
const knownTypes = new Set(["reset", "greeting", "update", "alert"]);

function setState(state) {
  const el = $("state");
  el.textContent = state;
  el.dataset.state = state;
  el.className = "state state-" + state;
}

function showEvent(event) {
  received += 1;
  $("event-count").textContent = String(received);
  if (event.lastEventId) $("last-id").textContent = "last id " + event.lastEventId;
  const item = document.createElement("li");
  item.dataset.type = event.type;
  item.dataset.id = event.lastEventId;
  const type = document.createElement("span");
  type.className = "type" + (event.type === "message" ? "" : " named") + (event.type === "reset" ? " reset" : "");
  type.textContent = event.type;
  const meta = document.createElement("span");
  meta.className = "id";
  meta.textContent = (event.lastEventId || "no id") + " · " + new Date().toLocaleTimeString();
  const data = document.createElement("pre");
  data.className = "data";
  data.textContent = event.data;
  item.append(type, meta, data);
  $("events").prepend(item);
}

function listenFor(type) {
  if (source && !source.listening.has(type)) {
    source.addEventListener(type, showEvent);
    source.listening.add(type);
  }
}

function connect(topics) {
  disconnect();
  const query = topics.map((t) => "topic=" + encodeURIComponent(t)).join("&");
  source = new EventSource("/events?" + query);
  source.listening = new Set();
  setState("connecting");
  source.onopen = () => setState("open");
  source.onerror = () => {
    // readyState CONNECTING means the browser is reconnecting by itself and will
    // send Last-Event-ID; CLOSED means it gave up (for example on a 4xx answer).
    setState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  };
  source.onmessage = showEvent;
  knownTypes.forEach(listenFor);
  $("connect").textContent = "Reconnect";
  $("disconnect").disabled = false;
}

function disconnect() {
  if (source) source.close();
  source = null;
  setState("closed");
  $("connect").textContent = "Connect";
  $("disconnect").disabled = true;
}

async function publish(form) {
  const body = new URLSearchParams();
  body.set("topic", $("publish-topic").value.trim());
  body.set("data", $("publish-data").value);
  const type = $("publish-event").value.trim();
  if (type) {
    body.set("event", type);
    knownTypes.add(type);
    listenFor(type);
  }
  const headers = { "Content-Type": "application/x-www-form-urlencoded" };
  const token = $("publish-token").value;
  if (token) headers.Authorization = "Bearer " + token;
  try {
    const response = await fetch("/publish", { method: "POST", headers, body });
    const text = await response.text();
    if (response.ok) {
      const result = JSON.parse(text);
      $("publish-result").textContent = `sent ${result.id} to ${result.subscribers} subscriber(s)`;
    } else {
      $("publish-result").textContent = `${response.status}: ${text.trim()}`;
    }
  } catch (error) {
    $("publish-result").textContent = "failed: " + error;
  }
}

$("subscribe-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const topics = $("topics").value.split(",").map((t) => t.trim()).filter(Boolean);
  if (topics.length) connect(topics);
});
$("disconnect").addEventListener("click", disconnect);
$("publish-form").addEventListener("submit", (event) => {
  event.preventDefault();
  publish(event.target);
});

// ?topics=a,b&types=x,y&autoconnect=1 preconfigures the page (used by the browser test).
const params = new URLSearchParams(location.search);
if (params.get("topics")) $("topics").value = params.get("topics");
(params.get("types") || "").split(",").filter(Boolean).forEach((t) => knownTypes.add(t));
if (params.get("autoconnect") !== "0") $("subscribe-form").requestSubmit();
