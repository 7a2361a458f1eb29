// The WebSocket to /netstat of whoever served this page: a node's agent and the cluster-wide
// multiplexer serve the same UI and the same protocol, so the client is the same for both.

import { widens } from "./filters.js";

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 15_000;

export function streamURL(loc = window.location, query = "") {
  // Relative to the page, so the UI also works behind a path prefix (e.g. kubectl proxy).
  const url = new URL("netstat", loc.href);
  url.protocol = loc.protocol === "https:" ? "wss:" : "ws:";
  url.search = query;
  url.hash = "";
  return url.toString();
}

// Calls onSession() when a connection opens (a fresh snapshot follows), onEvents(list) per frame and
// onStatus({state, attempt, retryAt, refused}) when the connection state changes (refused: closed before it
// opened, e.g. a 401 once the session expired). Reconnects with backoff. urlFor(filter) is the URL to
// open with a subscription; subscribe(filter) changes it on the open connection and for the next
// reconnect.
export class Stream {
  constructor(urlFor, { onSession, onEvents, onStatus }, filter = {}) {
    this.urlFor = urlFor;
    this.filter = filter;
    this.onSession = onSession;
    this.onEvents = onEvents;
    this.onStatus = onStatus;
    this.attempt = 0;
    this.ws = null;
    this.version = 0; // of the partial re-subscriptions sent
  }

  start() {
    this.onStatus({ state: "connecting", attempt: this.attempt });
    const ws = new WebSocket(this.urlFor(this.filter));
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.onSession();
      this.onStatus({ state: "connected", attempt: this.attempt });
    };
    ws.onmessage = (msg) => {
      // Reset the backoff only once data flows: an agent that accepts and drops us must not be hammered.
      this.attempt = 0;
      let data;
      try {
        data = JSON.parse(msg.data);
      } catch {
        console.warn("netstatd: ignoring a frame that is not JSON");
        return;
      }
      this.onEvents(Array.isArray(data) ? data : [data]);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      // Jitter, so many open pages do not all reconnect at the same instant after an agent restart.
      const delay = Math.min(FIRST_DELAY_MS * 2 ** this.attempt, MAX_DELAY_MS) * (0.8 + 0.4 * Math.random());
      this.attempt++;
      this.onStatus({ state: "reconnecting", attempt: this.attempt, retryAt: Date.now() + delay, refused: !opened });
      setTimeout(() => this.start(), delay);
    };
  }

  // True when the filter changed (and was sent, when connected). A filter that only widens is sent
  // partial: the server keeps what the page holds and sends just the rows it adds. Otherwise, or with
  // again (the whole snapshot again, even if unchanged), the server answers with a stream.reset and
  // the new filter's snapshot.
  subscribe(filter, again = false) {
    if (!again && JSON.stringify(filter) === JSON.stringify(this.filter)) return false;
    const frame = { type: "subscribe", filter };
    if (!again && widens(this.filter, filter)) Object.assign(frame, { partial: true, version: ++this.version });
    this.filter = filter;
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    return true;
  }
}
