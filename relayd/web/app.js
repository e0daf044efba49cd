// The page relayd serves under /app/: log in, pick a client from the directory, chat, and see
// each message's receipts. Everything it shows goes through textContent: nothing a peer sends
// is ever parsed as HTML.
import { RelaydClient } from "./relayd.js";

const DIRECTORY_POLL_MS = 5000;
const STATUS_MARKS = {
  sending: "…",
  sent: "→",
  queued_offline: "⌛",
  queued: "⌛",
  pending_ack: "✓",
  accepted: "✓",
  delivered: "✓",
  acknowledged: "✓✓",
  failed: "✗",
  expired: "✗",
  rejected: "✗",
};

const $ = (selector) => document.querySelector(selector);
const wsPath = $('meta[name="relayd-websocket-path"]').content || "/ws";

let client = null;
let peer = null; // the uuid of the conversation shown
let directoryTimer = null;
const names = new Map(); // uuid -> name
const online = new Map(); // uuid -> bool
const conversations = new Map(); // uuid -> [li, ...]
const seen = new Set(); // "from/msgid" of messages shown: redeliveries are not shown twice
const MAX_SEEN = 10000; // the oldest are forgotten beyond this
const unread = new Map(); // uuid -> count

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(where, error) {
  $(where).textContent = error ? `${error.message}${error.code ? ` (${error.code})` : ""}` : "";
}

function shortId(uuid) {
  return uuid.slice(0, 8);
}

function time(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

// --- logging in ------------------------------------------------------------------------------

async function onRegister(event) {
  event.preventDefault();
  const name = event.target.elements.name.value.trim();
  showError("#login-error", null);
  try {
    const { client: registered, secret } = await RelaydClient.register(name, { wsPath });
    $("#credentials-uuid").textContent = registered.uuid;
    $("#credentials-secret").textContent = secret;
    $("#credentials").hidden = false;
    start(registered);
  } catch (error) {
    showError("#login-error", error);
  }
}

async function onLogin(event) {
  event.preventDefault();
  const form = event.target.elements;
  showError("#login-error", null);
  try {
    const loggedIn = await RelaydClient.login(form.uuid.value, form.secret.value, { wsPath });
    form.secret.value = "";
    start(loggedIn);
  } catch (error) {
    showError("#login-error", error);
  }
}

function start(newClient) {
  client = newClient;
  $("#login").hidden = true;
  $("#chat").hidden = false;
  $("#logout").hidden = false;
  showMe();
  client.addEventListener("state", onState);
  client.addEventListener("error", (event) => showError("#chat-error", event.detail));
  client.onMessage = onMessage;
  client.connect();
  loadDirectory();
  directoryTimer = setInterval(loadDirectory, DIRECTORY_POLL_MS);
}

function showMe() {
  const me = $("#me");
  me.textContent = `${client.name ?? ""} · ${client.uuid}`;
  me.dataset.uuid = client.uuid;
}

function onState(event) {
  const { state, reason, delay } = event.detail;
  const badge = $("#state");
  badge.dataset.state = state;
  badge.textContent = state === "reconnecting" && delay !== undefined ? `reconnecting in ${delay.toFixed(1)} s` : state;
  if (state === "open") {
    showMe();
    showError("#chat-error", null);
  }
  if (state === "stopped" && reason !== "logged_out" && reason !== "closed") {
    const why = {
      revoked: "This login was revoked: log in again.",
      replaced: "This client connected somewhere else.",
      unauthenticated: "The session ended: log in again.",
    };
    leave(why[reason] ?? `Disconnected (${reason}).`);
  }
}

async function onLogout() {
  const leaving = client;
  leave("");
  try {
    await leaving.logout();
  } catch (error) {
    showError("#login-error", error);
  }
}

function leave(message) {
  if (client !== null) client.close();
  client = null;
  peer = null;
  clearInterval(directoryTimer);
  for (const map of [names, online, conversations, unread]) map.clear();
  seen.clear();
  $("#directory").replaceChildren();
  $("#messages").replaceChildren();
  $("#credentials").hidden = true;
  $("#chat").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#me").textContent = "";
  delete $("#me").dataset.uuid;
  $("#state").dataset.state = "idle";
  $("#state").textContent = "";
  $("#login-error").textContent = message;
}

// --- the directory ---------------------------------------------------------------------------

async function loadDirectory() {
  const current = client;
  if (current === null) return;
  let items;
  try {
    items = await current.directory();
  } catch (error) {
    showError("#chat-error", error);
    return;
  }
  if (current !== client) return; // logged out meanwhile
  for (const item of items) {
    names.set(item.uuid, item.name);
    online.set(item.uuid, item.online);
  }
  renderDirectory();
}

function renderDirectory() {
  const entries = [];
  for (const [uuid, name] of names) {
    if (uuid === client.uuid) continue;
    const button = element("button");
    button.type = "button";
    button.dataset.uuid = uuid;
    button.dataset.online = String(online.get(uuid) === true);
    button.setAttribute("aria-current", String(uuid === peer));
    button.title = online.get(uuid) ? "online" : "offline";
    button.append(
      element("span", "dot"),
      element("span", "name", name),
      element("span", "unread", unread.get(uuid) ? String(unread.get(uuid)) : ""),
      element("span", "id", shortId(uuid)),
    );
    button.addEventListener("click", () => choose(uuid));
    const item = element("li");
    item.append(button);
    entries.push(item);
  }
  $("#directory").replaceChildren(...entries);
}

function choose(uuid) {
  peer = uuid;
  unread.delete(uuid);
  $("#peer").textContent = `${names.get(uuid) ?? "?"} · ${uuid}`;
  $("#peer").dataset.uuid = uuid;
  $("#messages").replaceChildren(...(conversations.get(uuid) ?? []));
  for (const control of $("#send-form").elements) control.disabled = false;
  $("#send-form").elements.text.focus();
  renderDirectory();
}

// --- messages --------------------------------------------------------------------------------

function append(uuid, item) {
  if (!conversations.has(uuid)) conversations.set(uuid, []);
  conversations.get(uuid).push(item);
  if (uuid === peer) {
    $("#messages").append(item);
    item.scrollIntoView({ block: "nearest" });
  }
}

function onSend(event) {
  event.preventDefault();
  const input = event.target.elements.text;
  const text = input.value;
  if (peer === null || text === "") return;
  let outgoing;
  try {
    outgoing = client.send(peer, text);
  } catch (error) {
    showError("#chat-error", error);
    return;
  }
  input.value = "";
  const item = element("li", "message out");
  item.dataset.msgid = outgoing.msgid;
  const meta = element("span", "meta");
  item.append(element("span", "text", text), meta);
  const trail = [];
  const show = () => {
    item.dataset.status = outgoing.status;
    if (trail.at(-1) !== outgoing.status) trail.push(outgoing.status);
    item.dataset.trail = trail.join(" ");
    meta.textContent = `${STATUS_MARKS[outgoing.status] ?? ""} ${outgoing.status}`;
    meta.title = trail.join(" → ");
    if (outgoing.error) meta.title += `: ${outgoing.error.message}`;
  };
  show();
  outgoing.addEventListener("status", show);
  append(peer, item);
}

function onMessage(message) {
  const from = message.from;
  const key = `${from}/${message.msgid}`;
  if (seen.has(key)) return; // a redelivery of one shown already: acknowledged again
  seen.add(key);
  if (seen.size > MAX_SEEN) seen.delete(seen.values().next().value);
  const item = element("li", "message in");
  item.dataset.msgid = message.msgid;
  item.dataset.from = from;
  const meta = `${names.get(from) ?? shortId(from)} · ${time(message.timestamp)}`;
  item.append(
    element("span", "text", message.content),
    element("span", "meta", message.redelivered ? `${meta} · redelivered` : meta),
  );
  append(from, item);
  if (from !== peer) unread.set(from, (unread.get(from) ?? 0) + 1);
  if (!names.has(from)) loadDirectory();
  else renderDirectory();
}

// --- wiring ----------------------------------------------------------------------------------

$("#register-form").addEventListener("submit", onRegister);
$("#login-form").addEventListener("submit", onLogin);
$("#logout").addEventListener("click", onLogout);
$("#reload-directory").addEventListener("click", loadDirectory);
$("#send-form").addEventListener("submit", onSend);
$("#credentials-done").addEventListener("click", () => {
  $("#credentials").hidden = true;
  $("#credentials-secret").textContent = "";
});
document.body.dataset.ready = "true";
