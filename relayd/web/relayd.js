/**
 * relayd.js: a browser client for relayd. One ES module, no dependencies, no build step.
 *
 *     import { RelaydClient } from "/app/relayd.js";
 *     const { client, secret } = await RelaydClient.register("kitchen");  // keep `secret`
 *     // or: const client = await RelaydClient.login(uuid, secret);
 *     client.onMessage = async (message) => show(message);  // acknowledged once it returns
 *     client.connect();
 *     const sent = client.send(peerUuid, "hello");
 *     sent.addEventListener("status", () => console.log(sent.status));
 *     console.log((await sent.done).status);  // delivered, acknowledged, failed, expired...
 *
 * What it does, in the terms of docs/protocol.md:
 *
 * - Tokens. The access and refresh tokens (and the client secret, when given) live in private
 *   fields of the client object, in memory only: never in localStorage or sessionStorage, never
 *   in a URL. A reload forgets them (log in again with uuid and secret): in exchange no other
 *   script of the origin, no later page of the tab and no duplicated tab can find them, and no
 *   two tabs ever hold one refresh token (the second to use it would revoke the login).
 * - The WebSocket carries the access token in its subprotocol list, `relayd.v1` beside
 *   `bearer.<token>`; relayd selects `relayd.v1`, never the token.
 * - Refresh. Three quarters into an access token's lifetime (or when relayd sends
 *   `token_expiring`) the client rotates its tokens at POST /auth/refresh and hands the new
 *   access token to the live socket (`{"type": "refresh"}`), without reconnecting. A refresh
 *   token is presented once at most: it is dropped before the request goes out, and put back
 *   only when relayd refused the request unread (429). When the answer is lost (network error,
 *   5xx) or the refresh token has expired, the client logs in again with its secret if it has
 *   one; a refresh token that relayd calls revoked or reused ends the session.
 * - Reconnect, with exponential backoff and full jitter (`backoffDelay`), following the close
 *   code (`closeAction`): never after 4003 (revoked) or 4009 (replaced by a newer session);
 *   after 4001 with a fresh token; after 1001 and 4029 no sooner than 1 s and 5 s.
 * - Sending. `send()` returns an `Outgoing` whose `status` follows the receipts (`sending`,
 *   `sent`, then relayd's: `queued_offline`, `queued`, `pending_ack`, and the final
 *   `delivered`, `acknowledged`, `failed`, `expired`; or `rejected` when relayd refused it
 *   with an error frame). A message written to a socket that closed before its first receipt
 *   is sent again, with the same msgid, after the reconnect: relayd's deduplication keeps it
 *   from arriving twice.
 * - Receiving. Messages are handed to `onMessage` one at a time, in order; a message with
 *   `acknowledge: true` is acknowledged after the handler returns, on the socket it came on.
 *   A handler that throws leaves it unacknowledged: relayd delivers it again, flagged
 *   `redelivered`.
 * - `directory()`: GET /clients, every client with its `online` state.
 *
 * Events (a `RelaydClient` is an EventTarget; each event's `detail` says more): `state`
 * (`connecting`, `open`, `reconnecting`, `stopped`; with `reason`, `code`, the close frame's
 * `message`, and the `delay` before the next attempt),
 * `message`, `receipt`, `rotated` (a new token pair), `refreshed` (the live session runs on
 * the new token), `shutdown` and `error` (detail: a `RelaydError`).
 */

export const SUBPROTOCOL = "relayd.v1";
export const FINAL_STATUSES = Object.freeze([
  "delivered",
  "acknowledged",
  "failed",
  "expired",
  "rejected",
]);

// Messages waiting for their final receipt, at most: beyond, send() refuses.
export const MAX_OUTBOX = 1000;
// A socket that has not been welcomed this long after it was opened is given up on.
const WELCOME_TIMEOUT_MS = 15_000;
// A REST request that has not been answered this long is abandoned.
const REQUEST_TIMEOUT_MS = 15_000;
// setTimeout's longest delay (2^31 - 1 ms); longer ones fire at once.
const MAX_TIMER_MS = 2_147_483_647;
// Refresh codes that mean the refresh token cannot have been used: log in again with the
// secret, if held. Any other refusal (revoked, reused, invalid) ends the session.
const LOG_IN_AGAIN_AFTER = new Set(["network_error", "internal_error", "http_error", "token_expired"]);
// Failures to get a token that may pass: try again later.
const TRANSIENT = new Set(["network_error", "internal_error", "http_error", "rate_limited"]);

/** An error relayd answered (REST or error frame), or a failure to reach it. */
export class RelaydError extends Error {
  constructor(code, message, { status = 0, details = {}, retryAfter = null } = {}) {
    super(message);
    this.name = "RelaydError";
    this.code = code;
    this.status = status;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

/**
 * What to do when the socket closed with `code` (docs/protocol.md, "Close codes").
 * Returns `{reconnect, reason, minDelay}` (seconds), and `newToken` for 4001.
 */
export function closeAction(code) {
  switch (code) {
    case 4003:
      return { reconnect: false, reason: "revoked", minDelay: 0 };
    case 4009:
      return { reconnect: false, reason: "replaced", minDelay: 0 };
    case 4001:
      return { reconnect: true, reason: "unauthenticated", minDelay: 0, newToken: true };
    case 4029:
      return { reconnect: true, reason: "limited", minDelay: 5 };
    case 1001:
      return { reconnect: true, reason: "server_stopping", minDelay: 1 };
    default:
      return { reconnect: true, reason: "connection_lost", minDelay: 0 };
  }
}

/**
 * Seconds to wait before reconnect attempt `attempt` (0 for the first): exponential backoff
 * with full jitter, `initial * 2^attempt` capped at `max`, scaled by `random()` in [0, 1), and
 * never less than `minDelay`.
 */
export function backoffDelay(attempt, { initial = 0.5, max = 30, minDelay = 0, random = Math.random } = {}) {
  const ceiling = Math.min(max, initial * 2 ** Math.min(attempt, 32));
  return Math.max(minDelay, ceiling * random());
}

/** Seconds after a token pair was issued that it is rotated: three quarters of its life. */
export function refreshDelay(expiresIn) {
  return Math.max(0, expiresIn * 0.75);
}

/** A random UUID (version 4); crypto.randomUUID needs a secure context, this does not. */
export function newMsgid() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function timer(callback, seconds) {
  return setTimeout(callback, Math.min(MAX_TIMER_MS, Math.max(0, seconds * 1000)));
}

/** A message sent: its status follows the receipts; `done` resolves with the final receipt. */
export class Outgoing extends EventTarget {
  #resolve;

  constructor(frame) {
    super();
    this.frame = frame;
    this.msgid = frame.msgid;
    this.to = frame.to;
    this.content = frame.content;
    this.status = "sending";
    this.receipts = [];
    this.done = new Promise((resolve) => {
      this.#resolve = resolve;
    });
  }

  get final() {
    return FINAL_STATUSES.includes(this.status);
  }

  /** Record a status (a receipt, or the client's own `sending`/`sent`/`rejected`). */
  _move(status, receipt = null) {
    if (this.final) return false;
    if (receipt !== null) this.receipts.push(receipt);
    // A duplicate's "accepted" says only that relayd has the message: keep what is known.
    if (!(status === "accepted" && this.status !== "sending" && this.status !== "sent")) {
      this.status = status;
    }
    this.dispatchEvent(new CustomEvent("status", { detail: { status: this.status, receipt } }));
    if (this.final) this.#resolve(receipt ?? { type: "local", msgid: this.msgid, status: this.status });
    return true;
  }
}

export class RelaydClient extends EventTarget {
  // Credentials: private, in memory only (see the module's documentation).
  #access = null;
  #refresh = null;
  #secret = null;
  #refreshAt = 0; // Date.now() from which the access token should be rotated
  #expiresAt = 0; // the access token's exp, on relayd's clock
  #refreshing = null; // the rotation under way
  #refreshTimer = null;

  #fetch;
  #WebSocket;
  #random;
  #ws = null;
  #welcomed = false;
  #generation = 0; // of the socket: events of an older one are ignored
  #attempt = 0; // reconnects since the last welcome
  #stopped = true;
  #reconnectTimer = null;
  #welcomeTimer = null;
  #resendTimer = null;
  #outbox = new Map(); // msgid -> Outgoing, until final
  #incoming = Promise.resolve(); // messages are handled one after another

  /**
   * Options: `baseUrl` (default: the page's origin), `wsPath` (default `/ws`), and for tests
   * `fetch`, `WebSocket` and `random`.
   */
  constructor({
    baseUrl = globalThis.location?.origin,
    wsPath = "/ws",
    fetch = globalThis.fetch?.bind(globalThis),
    WebSocket = globalThis.WebSocket,
    random = Math.random,
  } = {}) {
    super();
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.wsPath = wsPath;
    this.#fetch = fetch;
    this.#WebSocket = WebSocket;
    this.#random = random;
    this.uuid = null;
    this.name = null;
    this.state = "idle";
    /** `async (message) => ...`, awaited before the message is acknowledged. */
    this.onMessage = null;
  }

  /** Register a new client; returns `{client, secret}`. Keep the secret: relayd shows it once. */
  static async register(name, { uuid = null, ...options } = {}) {
    const client = new RelaydClient(options);
    const body = uuid ? { name, uuid } : { name };
    const answer = await client.#request("POST", "/register", { body });
    client.uuid = answer.uuid;
    client.name = answer.name;
    client.#secret = answer.client_secret;
    client.#adopt(answer);
    return { client, secret: answer.client_secret };
  }

  /** Log in with a client's uuid and secret. */
  static async login(uuid, secret, options = {}) {
    const client = new RelaydClient(options);
    client.uuid = String(uuid).trim().toLowerCase();
    client.#secret = secret;
    await client.#logIn();
    return client;
  }

  /** Open the WebSocket, and keep it open (reconnecting) until `close()` or `logout()`. */
  connect() {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#attempt = 0;
    this.#scheduleRefresh();
    this.#open();
  }

  /** Close the socket and stay closed. The tokens are kept: `connect()` opens it again. */
  close() {
    this.#stop("closed");
  }

  /** Close, and end this login at relayd (its refresh token and access tokens are revoked). */
  async logout() {
    this.#stop("logged_out");
    await this.#refreshing?.catch(() => {});
    const refresh = this.#refresh;
    this.#access = this.#refresh = this.#secret = null;
    if (refresh !== null) {
      await this.#request("POST", "/auth/revoke", { body: { refresh_token: refresh } });
    }
  }

  /** Every registered client, oldest first: `{uuid, name, created_at, online}`. */
  async directory() {
    const doc = await this.#authorized("GET", "/clients");
    return doc.items;
  }

  /**
   * Send `content` to the client `to`. Options: `acknowledge` (default true: at least once,
   * with an `acknowledged` receipt), `msgid`, `subject`, `priority`, `conversationId`, `ttl`.
   * Returns an `Outgoing`; while the socket is down it waits (`sending`) and goes out on the
   * next session.
   */
  send(to, content, { acknowledge = true, msgid = newMsgid(), subject, priority, conversationId, ttl } = {}) {
    if (this.#outbox.size >= MAX_OUTBOX) {
      throw new RelaydError("outbox_full", `${MAX_OUTBOX} messages are waiting for their final receipt`);
    }
    if (this.#outbox.has(msgid)) {
      throw new RelaydError("duplicate_msgid", `a message with msgid ${msgid} is on its way`);
    }
    const frame = { type: "message", to, msgid, content: String(content), acknowledge };
    if (subject !== undefined) frame.subject = subject;
    if (priority !== undefined) frame.priority = priority;
    if (conversationId !== undefined) frame.conversation_id = conversationId;
    if (ttl !== undefined) frame.ttl = ttl;
    const outgoing = new Outgoing(frame);
    this.#outbox.set(msgid, outgoing);
    this.#flush();
    return outgoing;
  }

  /** Rotate the tokens now (at most one rotation runs at a time). */
  refresh() {
    this.#refreshing ??= this.#rotate().finally(() => {
      this.#refreshing = null;
    });
    return this.#refreshing;
  }

  // --- tokens --------------------------------------------------------------------------------

  #adopt(answer) {
    this.#access = answer.access_token;
    this.#refresh = answer.refresh_token;
    this.#expiresAt = answer.expires_at;
    this.#refreshAt = Date.now() + refreshDelay(answer.expires_in) * 1000;
    this.#scheduleRefresh();
  }

  /** Rotate at #refreshAt (or after `seconds`), while the client is connected. */
  #scheduleRefresh(seconds = (this.#refreshAt - Date.now()) / 1000) {
    clearTimeout(this.#refreshTimer);
    if (this.#stopped) return; // connect() schedules it
    this.#refreshTimer = timer(() => {
      this.refresh().catch((error) => {
        this.#emitError(error);
        if (error.code === "rate_limited") this.#scheduleRefresh(error.retryAfter ?? 1);
      });
    }, seconds);
  }

  /**
   * relayd warns that the session's token expires at `expiresAt` (its clock). If that is the
   * newest token, rotate; if a newer one exists, the session has not been handed it yet.
   */
  #onExpiring(expiresAt) {
    if (expiresAt < this.#expiresAt) this.#handToSocket();
    else this.refresh().catch((error) => this.#emitError(error));
  }

  async #logIn() {
    const answer = await this.#request("POST", "/auth/token", {
      body: { uuid: this.uuid, client_secret: this.#secret },
    });
    this.#adopt(answer);
    this.#handToSocket();
  }

  async #rotate() {
    const presented = this.#refresh;
    if (presented === null) {
      // Refused for good (revoked, reused) or logged out: logging in again is the user's call.
      throw new RelaydError("no_credentials", "this login is over: log in again");
    }
    this.#refresh = null; // spent from now on, whatever becomes of the request
    let answer;
    try {
      answer = await this.#request("POST", "/auth/refresh", { body: { refresh_token: presented } });
    } catch (error) {
      if (error.code === "rate_limited") {
        this.#refresh = presented; // refused before relayd looked at it: still unspent
      } else if (this.#secret !== null && LOG_IN_AGAIN_AFTER.has(error.code)) {
        return this.#logIn();
      }
      throw error;
    }
    this.#adopt(answer);
    this.dispatchEvent(new CustomEvent("rotated"));
    this.#handToSocket();
  }

  /** The new access token to the live session, which then runs on it (no reconnect). */
  #handToSocket() {
    if (this.#welcomed) this.#write({ type: "refresh", token: this.#access });
  }

  async #freshToken() {
    if (this.#access === null || Date.now() >= this.#refreshAt) await this.refresh();
    return this.#access;
  }

  // --- REST ----------------------------------------------------------------------------------

  async #request(method, path, { body = null, token = null } = {}) {
    const headers = {};
    if (body !== null) headers["Content-Type"] = "application/json";
    if (token !== null) headers.Authorization = `Bearer ${token}`;
    const abort = new AbortController();
    const deadline = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    try {
      let response;
      let doc = null;
      try {
        response = await this.#fetch(this.baseUrl + path, {
          method,
          headers,
          body: body === null ? undefined : JSON.stringify(body),
          signal: abort.signal,
          cache: "no-store",
          credentials: "omit",
          referrerPolicy: "no-referrer",
        });
        doc = await response.json().catch(() => null);
      } catch (error) {
        throw new RelaydError("network_error", `${method} ${path}: ${error.message}`);
      }
      if (!response.ok) {
        const e = doc?.error ?? {};
        const code = e.code ?? (response.status >= 500 ? "http_error" : `http_${response.status}`);
        const retry = Number(response.headers.get("Retry-After")) || e.details?.retry_after || null;
        throw new RelaydError(code, e.message ?? `${method} ${path}: HTTP ${response.status}`, {
          status: response.status,
          details: e.details ?? {},
          retryAfter: retry,
        });
      }
      return doc;
    } finally {
      clearTimeout(deadline);
    }
  }

  async #authorized(method, path) {
    await this.#freshToken();
    try {
      return await this.#request(method, path, { token: this.#access });
    } catch (error) {
      if (error.code !== "token_expired") throw error;
      await this.refresh();
      return this.#request(method, path, { token: this.#access });
    }
  }

  // --- the socket ----------------------------------------------------------------------------

  #setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  #emitError(error) {
    this.dispatchEvent(new CustomEvent("error", { detail: error }));
  }

  #stop(reason, code = null) {
    this.#stopped = true;
    this.#generation += 1;
    this.#welcomed = false;
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#welcomeTimer);
    clearTimeout(this.#resendTimer);
    clearTimeout(this.#refreshTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws !== null && ws.readyState <= 1) ws.close(1000, reason);
    this.#unsent();
    this.#setState("stopped", { reason, code });
  }

  #wsUrl() {
    const url = new URL(this.wsPath, this.baseUrl);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  async #open() {
    clearTimeout(this.#reconnectTimer);
    this.#setState(this.#attempt === 0 ? "connecting" : "reconnecting", { attempt: this.#attempt });
    const generation = ++this.#generation;
    let token;
    try {
      token = await this.#freshToken();
    } catch (error) {
      if (generation !== this.#generation) return;
      this.#emitError(error);
      if (TRANSIENT.has(error.code)) this.#retry(closeAction(0), error.code);
      else this.#stop("unauthenticated");
      return;
    }
    if (generation !== this.#generation) return; // closed meanwhile
    let ws;
    try {
      ws = new this.#WebSocket(this.#wsUrl(), [SUBPROTOCOL, `bearer.${token}`]);
    } catch (error) {
      this.#emitError(new RelaydError("websocket_refused", error.message));
      this.#retry(closeAction(0), "websocket_refused");
      return;
    }
    this.#ws = ws;
    this.#welcomeTimer = timer(() => {
      if (generation === this.#generation) ws.close(1000, "no welcome in time");
    }, WELCOME_TIMEOUT_MS / 1000);
    ws.onmessage = (event) => {
      if (generation === this.#generation) this.#onFrame(event.data, ws);
    };
    ws.onclose = (event) => {
      if (generation === this.#generation) this.#onClose(event.code, event.reason);
    };
  }

  #onClose(code, reason) {
    clearTimeout(this.#welcomeTimer);
    this.#ws = null;
    this.#welcomed = false;
    this.#unsent();
    const action = closeAction(code);
    if (!action.reconnect) {
      this.#stop(action.reason, code);
      return;
    }
    if (action.newToken) this.#refreshAt = 0; // the next attempt gets a fresh token first
    this.#retry(action, action.reason, code, reason);
  }

  #retry(action, reason, code = null, message = "") {
    const delay = backoffDelay(this.#attempt, { minDelay: action.minDelay, random: this.#random });
    this.#attempt += 1;
    this.#setState("reconnecting", { reason, code, message, delay, attempt: this.#attempt });
    this.#reconnectTimer = timer(() => this.#open(), delay);
  }

  /** Messages written to a socket that closed before their first receipt go out again. */
  #unsent() {
    for (const outgoing of this.#outbox.values()) {
      if (outgoing.status === "sent") outgoing._move("sending");
    }
  }

  #write(frame) {
    if (this.#ws === null || this.#ws.readyState !== 1) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  #flush() {
    if (!this.#welcomed) return;
    for (const outgoing of this.#outbox.values()) {
      if (outgoing.status === "sending" && this.#write(outgoing.frame)) outgoing._move("sent");
    }
  }

  #onFrame(data, ws) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this.#emitError(new RelaydError("bad_frame", "relayd sent a frame that is not JSON"));
      return;
    }
    switch (frame?.type) {
      case "connection":
        clearTimeout(this.#welcomeTimer);
        this.#welcomed = true;
        this.#attempt = 0;
        this.uuid = frame.uuid;
        this.name = frame.name;
        this.#setState("open", { uuid: frame.uuid, name: frame.name });
        this.#flush();
        break;
      case "message":
        this.#incoming = this.#incoming.then(() => this.#deliver(frame, ws));
        break;
      case "delivery_status":
      case "delivery_update":
        this.#onReceipt(frame);
        break;
      case "token_expiring":
        this.#onExpiring(frame.expires_at);
        break;
      case "token_refreshed":
        this.dispatchEvent(new CustomEvent("refreshed", { detail: frame }));
        break;
      case "shutdown":
        this.dispatchEvent(new CustomEvent("shutdown", { detail: frame }));
        break;
      case "error":
        this.#onErrorFrame(frame);
        break;
      default:
        break; // ack_received, pong: nothing to do
    }
  }

  async #deliver(frame, ws) {
    const message = { ...frame };
    try {
      this.dispatchEvent(new CustomEvent("message", { detail: message }));
      if (this.onMessage !== null) await this.onMessage(message);
    } catch (error) {
      // Unacknowledged, relayd delivers it again.
      this.#emitError(new RelaydError("handler_failed", `handling ${frame.msgid}: ${error.message}`));
      return;
    }
    // An ack counts only on the session the message came on.
    if (frame.acknowledge === true && ws === this.#ws && ws.readyState === 1) {
      ws.send(JSON.stringify({ type: "ack", msgid: frame.msgid }));
    }
  }

  #onReceipt(frame) {
    this.dispatchEvent(new CustomEvent("receipt", { detail: frame }));
    const outgoing = this.#outbox.get(frame.msgid);
    if (outgoing === undefined) return;
    outgoing._move(frame.status, frame);
    if (outgoing.final) this.#outbox.delete(frame.msgid);
  }

  #onErrorFrame(frame) {
    const e = frame.error ?? {};
    const details = e.details ?? {};
    const error = new RelaydError(e.code ?? "error", e.message ?? "", {
      details,
      retryAfter: details.retry_after ?? null,
    });
    const outgoing = details.msgid === undefined ? undefined : this.#outbox.get(details.msgid);
    if (outgoing !== undefined) {
      if (e.code === "rate_limited") {
        // Not accepted: it goes out again once the wait is over.
        outgoing._move("sending");
        clearTimeout(this.#resendTimer);
        this.#resendTimer = timer(() => this.#flush(), details.retry_after ?? 1);
      } else {
        outgoing.error = error;
        outgoing._move("rejected");
        this.#outbox.delete(outgoing.msgid);
      }
    }
    this.#emitError(error);
  }
}
