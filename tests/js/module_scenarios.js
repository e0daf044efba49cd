// Scenarios for relayd/web/relayd.js, run inside the /app/ page (under its own CSP) by
// tests/test_web_client.py: page.evaluate(<this function>, {name, ...}). Each returns what it
// observed; the Python test asserts on it. Every wait here has a deadline.
async ({ name, ...arg }) => {
  const relayd = await import("/app/relayd.js");
  const WAIT_MS = 8000;
  const state = (globalThis.__scenario ??= {});

  // The next `type` event of `target` whose detail satisfies `accept`, within `ms`.
  function next(target, type, accept = () => true, ms = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const deadline = setTimeout(() => {
        target.removeEventListener(type, listen);
        reject(new Error(`no ${type} event within ${ms} ms`));
      }, ms);
      function listen(event) {
        if (!accept(event.detail)) return;
        clearTimeout(deadline);
        target.removeEventListener(type, listen);
        resolve(event.detail);
      }
      target.addEventListener(type, listen);
    });
  }

  function within(promise, what, ms = WAIT_MS) {
    let deadline;
    const late = new Promise((_, reject) => {
      deadline = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
    });
    return Promise.race([promise, late]).finally(() => clearTimeout(deadline));
  }

  // A client with its state changes and errors recorded.
  function watched(client) {
    const seen = { states: [], errors: [], rotated: 0, refreshed: 0 };
    client.addEventListener("state", (e) => seen.states.push([e.detail.state, e.detail.reason ?? null, e.detail.code ?? null]));
    client.addEventListener("error", (e) => seen.errors.push(e.detail.code));
    client.addEventListener("rotated", () => (seen.rotated += 1));
    client.addEventListener("refreshed", () => (seen.refreshed += 1));
    return seen;
  }

  async function connected(client) {
    const open = next(client, "state", (d) => d.state === "open");
    client.connect();
    await open;
  }

  async function registered(label, options = {}) {
    const { client, secret } = await relayd.RelaydClient.register(label, { wsPath: "/ws", ...options });
    const seen = watched(client);
    return { client, secret, seen };
  }

  // A fake of relayd's REST API for the token logic: answers come from `plan`, in order.
  function fakeRest(plan) {
    const requests = [];
    const fetch = async (url, init) => {
      const body = init.body === undefined ? null : JSON.parse(init.body);
      requests.push([new URL(url).pathname, body]);
      const answer = plan.shift();
      if (answer === "network") throw new TypeError("Failed to fetch");
      const headers = { "Content-Type": "application/json", ...(answer.headers ?? {}) };
      return new Response(JSON.stringify(answer.body), { status: answer.status ?? 200, headers });
    };
    return { fetch, requests };
  }

  function pair(n) {
    const body = { uuid: "u-1", access_token: `A${n}`, refresh_token: `R${n}`, token_type: "bearer" };
    return { body: { ...body, expires_in: 900, expires_at: 2e9 + n } };
  }

  function refused(status, code, headers = {}) {
    return { status, headers, body: { error: { code, message: code, details: {} } } };
  }

  async function outcome(promise) {
    try {
      await promise;
      return "ok";
    } catch (error) {
      return error.code ?? String(error);
    }
  }

  // A fake of the browser's WebSocket: the scenario opens it, feeds it frames, drops it.
  class FakeSocket {
    static made = [];
    static waiting = [];
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.readyState = 0;
      FakeSocket.made.push(this);
      FakeSocket.waiting.shift()?.(this);
    }
    static next() {
      return within(new Promise((resolve) => FakeSocket.waiting.push(resolve)), "a new socket");
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close() {
      this.readyState = 3;
    }
    welcome() {
      this.readyState = 1;
      this.frame({ type: "connection", uuid: "u-1", name: "fake" });
    }
    frame(doc) {
      this.onmessage({ data: JSON.stringify(doc) });
    }
    drop(code) {
      this.readyState = 3;
      this.onclose({ code, reason: "" });
    }
  }

  const scenarios = {
    // The pure policies: what each close code means, the backoff, the refresh point.
    policies() {
      const codes = [1000, 1001, 1002, 1006, 1011, 4001, 4002, 4003, 4008, 4009, 4029];
      const actions = Object.fromEntries(codes.map((code) => [code, relayd.closeAction(code)]));
      const highest = () => 0.999999;
      const ceilings = [0, 1, 2, 3, 4, 5, 6, 7, 10].map((n) => relayd.backoffDelay(n, { random: highest }));
      const floors = [relayd.backoffDelay(0, { random: () => 0, minDelay: 5 }), relayd.backoffDelay(3, { random: () => 0 })];
      const ids = Array.from({ length: 50 }, () => relayd.newMsgid());
      return {
        actions,
        ceilings,
        floors,
        refresh: [relayd.refreshDelay(900), relayd.refreshDelay(2), relayd.refreshDelay(-1)],
        idsWellFormed: ids.every((id) => /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(id)),
        idsDistinct: new Set(ids).size,
      };
    },

    // The page's Content-Security-Policy: no inline script, no eval, nothing from or to
    // another origin (the same relayd as localhost is another origin).
    async contentPolicy({ otherOrigin }) {
      const script = document.createElement("script");
      script.textContent = "globalThis.__inlineRan = true";
      document.head.append(script);
      let evalRan = false;
      try {
        evalRan = (0, eval)("true");
      } catch {
        evalRan = false;
      }
      const otherFetch = await outcome(fetch(`${otherOrigin}/health/live`).then(() => null));
      const ownFetch = (await fetch("/health/live")).status;
      return { inlineRan: globalThis.__inlineRan === true, evalRan, otherFetch, ownFetch };
    },

    // A refresh token is presented once: not again after a lost answer (the client logs in
    // with its secret instead), again only after a 429 (refused unread), never after reuse.
    async spentRefreshTokens() {
      const rest = fakeRest([
        pair(1), // log in
        "network", // refresh R1: the answer is lost
        pair(2), // log in again with the secret
        refused(429, "rate_limited", { "Retry-After": "1" }), // refresh R2: refused unread
        pair(3), // refresh R2 again
        refused(500, "internal_error"), // refresh R3: 5xx, maybe spent
        pair(4), // log in again
        refused(401, "refresh_reused"), // refresh R4: its login is over
      ]);
      const options = { baseUrl: "http://relayd.test", fetch: rest.fetch };
      const client = await relayd.RelaydClient.login("U-1", "the-secret", options);
      const outcomes = [];
      for (let i = 0; i < 6; i += 1) outcomes.push(await outcome(client.refresh()));
      return { requests: rest.requests, outcomes };
    },

    // Against fakes of the socket and of REST: the token goes in the subprotocol, nothing is
    // sent before the welcome, a message written to a socket that closed before its first
    // receipt goes out again (same msgid) on the next one, 4001 gets a new token first, and
    // 4029 waits at least 5 s.
    async socketLifecycle() {
      const rest = fakeRest([pair(1), pair(2)]);
      const client = await relayd.RelaydClient.login("u-1", "s", {
        baseUrl: "http://relayd.test",
        fetch: rest.fetch,
        WebSocket: FakeSocket,
        random: () => 0,
      });
      const seen = watched(client);
      const statuses = [];
      let socket = FakeSocket.next();
      client.connect();
      const s1 = await socket;
      s1.readyState = 1; // the handshake is done, the welcome has not come
      const early = client.send("peer", "hello");
      early.addEventListener("status", () => statuses.push(early.status));
      const sentBeforeWelcome = s1.sent.length;
      s1.welcome();
      socket = FakeSocket.next();
      s1.drop(1006);
      const s2 = await socket;
      s2.welcome();
      s2.frame({ type: "delivery_status", msgid: early.msgid, status: "pending_ack" });
      s2.frame({ type: "delivery_update", msgid: early.msgid, status: "acknowledged" });
      const final = await within(early.done, "final receipt");
      socket = FakeSocket.next();
      s2.drop(4001);
      const s3 = await socket;
      s3.welcome();
      const limited = next(client, "state", (d) => d.state === "reconnecting");
      s3.drop(4029);
      const wait = (await limited).delay;
      client.close();
      return {
        urls: FakeSocket.made.map((s) => s.url),
        protocols: FakeSocket.made.map((s) => s.protocols),
        sent: FakeSocket.made.map((s) => s.sent.map((f) => [f.type, f.msgid === early.msgid])),
        sentBeforeWelcome,
        statuses,
        final: final.status,
        requests: rest.requests.map(([path]) => path),
        states: seen.states,
        wait,
      };
    },

    // Concurrent refreshes share one rotation.
    async oneRotationAtATime() {
      const rest = fakeRest([pair(1), pair(2)]);
      const client = await relayd.RelaydClient.login("u-1", "s", { baseUrl: "http://relayd.test", fetch: rest.fetch });
      const both = await Promise.all([outcome(client.refresh()), outcome(client.refresh())]);
      return { requests: rest.requests, both };
    },

    // relayd's access tokens last 3 s here: the client rotates them and hands each to the live
    // session, which stays open past several expiries.
    async rotatesInBand({ rotations }) {
      const a = await registered("rotating");
      await within(connected(a.client), "connect");
      const opened = performance.now();
      while (a.seen.refreshed < rotations) await next(a.client, "refreshed");
      const sent = a.client.send(a.client.uuid, "still here");
      const final = await within(sent.done, "final receipt");
      const openFor = (performance.now() - opened) / 1000;
      a.client.close();
      return { ...a.seen, final: final.status, openFor };
    },

    // The handler runs before the ack: a message stays pending_ack while it runs; a handler
    // that throws leaves it unacknowledged, and relayd delivers it again.
    async acksAfterTheHandler() {
      const a = await registered("sender");
      const b = await registered("receiver");
      const log = [];
      let release;
      const released = new Promise((resolve) => (release = resolve));
      let entered;
      const handling = new Promise((resolve) => (entered = resolve));
      let calls = 0;
      b.client.onMessage = async (message) => {
        if (message.content === "slow") {
          entered();
          await released;
          log.push(["handler returns", "slow"]);
          return;
        }
        calls += 1;
        log.push(["handler", message.content, message.attempt, message.redelivered]);
        if (calls === 1) throw new Error("not now");
      };
      await within(connected(a.client), "a connects");
      await within(connected(b.client), "b connects");

      const slow = a.client.send(b.client.uuid, "slow");
      slow.addEventListener("status", () => log.push(["status", slow.status]));
      await within(Promise.all([next(slow, "status", (d) => d.status === "pending_ack"), handling]), "slow handled");
      // A round trip through relayd while the handler holds the message: an early ack would
      // have come back by the time this one is acknowledged.
      const probe = a.client.send(a.client.uuid, "probe");
      await within(probe.done, "probe");
      log.push(["probe", probe.status, "slow is", slow.status]);
      release();
      await within(slow.done, "slow's final receipt");

      const throws = a.client.send(b.client.uuid, "throws");
      await within(throws.done, "throws' final receipt");
      a.client.close();
      b.client.close();
      return { log, throws: throws.receipts.map((r) => r.status), errors: b.seen.errors };
    },

    // 4009: a newer session of the same client replaces this one, which does not come back.
    // 4003: an admin revokes the client; its session ends for good.
    async stopsWhereTheCloseCodeSays({ adminToken }) {
      const a = await registered("twice");
      const twin = await relayd.RelaydClient.login(a.client.uuid, a.secret, { wsPath: "/ws" });
      const twinSeen = watched(twin);
      await within(connected(a.client), "first session");
      const stopped = next(a.client, "state", (d) => d.state === "stopped");
      await within(connected(twin), "second session");
      await stopped;
      const stopped2 = next(twin, "state", (d) => d.state === "stopped");
      const revoke = await fetch(`/admin/clients/${twin.uuid}/revoke`, {
        method: "POST",
        headers: { Authorization: `Bearer ${adminToken}` },
      });
      await stopped2;
      return { replaced: a.seen.states, revoked: twinSeen.states, revokeStatus: revoke.status };
    },

    // Across a restart of relayd: both clients see 1001 and reconnect on their own; a message
    // sent while relayd is down goes out after the reconnect and is acknowledged.
    async restartBegin() {
      const random = () => 0.5; // backoff: half of each ceiling
      state.a = await registered("before", { random });
      state.b = await registered("after", { random });
      state.got = [];
      state.b.client.onMessage = (message) => state.got.push([message.content, message.redelivered]);
      await within(connected(state.a.client), "a connects");
      await within(connected(state.b.client), "b connects");
      state.down = next(state.a.client, "state", (d) => d.state === "reconnecting" && d.code === 1001);
      return "ready";
    },
    async restartWhileDown() {
      const down = await within(state.down, "1001");
      state.sent = state.a.client.send(state.b.client.uuid, "sent while relayd was down");
      state.back = Promise.all([
        next(state.a.client, "state", (d) => d.state === "open", 15000),
        next(state.b.client, "state", (d) => d.state === "open", 15000),
      ]);
      return { down, status: state.sent.status };
    },
    async restartAfter() {
      await within(state.back, "both back", 15000);
      const final = await within(state.sent.done, "final receipt");
      const result = {
        a: state.a.seen.states,
        b: state.b.seen.states,
        final: final.status,
        trail: state.sent.receipts.map((r) => r.status),
        got: state.got,
      };
      state.a.client.close();
      state.b.client.close();
      return result;
    },
  };
  return await scenarios[name](arg);
}
