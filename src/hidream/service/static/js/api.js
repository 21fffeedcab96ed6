// The HTTP API, as the playground uses it: the envelope, errors that name their field, the progress
// stream (fetch + ReadableStream, since an EventSource cannot send the Authorization header) and a
// polling fallback for servers without the stream route.

/** An API error: HTTP status, the envelope's message, and the field that message names (or ""). */
export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
    this.field = fieldOf(message);
  }
}

/**
 * The request field an error message names: "num_inference_steps: must be ..." -> "num_inference_steps",
 * "reference_image_urls[1]: ..." -> "reference_image_urls[1]", "loras[0].scale: ..." -> "loras[0].scale".
 * Messages that do not start with a field name ("rate limit: ...", "invalid or revoked API key") name none.
 */
export function fieldOf(message) {
  const m = /^([a-z_]+(?:\[\d+\](?:\.[a-z_]+)?)?): /.exec(message || "");
  return m ? m[1] : "";
}

const TERMINAL = new Set(["completed", "failed"]);
export const isTerminal = (status) => TERMINAL.has(status);

export class Api {
  constructor(key = "") {
    this.key = key;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.key}`, ...extra };
  }

  /** `data` of a successful envelope; an ApiError otherwise (a network failure is status 0). */
  async request(method, path, { json, body, headers = {}, signal } = {}) {
    const init = { method, headers: this.headers(headers), signal };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "the server cannot be reached; check your connection and retry");
    }
    let envelope = null;
    try {
      envelope = await response.json();
    } catch {
      // not JSON: a proxy's error page, say
    }
    if (!response.ok || !envelope || envelope.code !== 200) {
      const message = (envelope && envelope.message) || `${response.status} ${response.statusText}`.trim();
      const retry = Number(response.headers.get("Retry-After")) || null;
      throw new ApiError(response.status, message, retry);
    }
    return envelope.data;
  }

  models() {
    return this.request("GET", "/api/v1/models");
  }

  usage() {
    return this.request("GET", "/api/v1/usage");
  }

  loras() {
    return this.request("GET", "/api/v1/loras");
  }

  predictions(limit, cursor) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (cursor) q.set("cursor", cursor);
    return this.request("GET", `/api/v1/predictions?${q}`);
  }

  prediction(id, signal) {
    return this.request("GET", `/api/v1/model/prediction/${encodeURIComponent(id)}`, { signal });
  }

  submit(body, idempotencyKey) {
    return this.request("POST", "/api/v1/model/generateImage", {
      json: body,
      headers: idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {},
    });
  }

  cancel(id) {
    return this.request("POST", `/api/v1/model/prediction/${encodeURIComponent(id)}/cancel`);
  }

  async upload(file, filename = "image") {
    const form = new FormData();
    form.append("file", file, file.name || filename);
    const data = await this.request("POST", "/api/v1/model/uploadMedia", { body: form });
    return data.url;
  }

  /**
   * Follows a prediction to its end, calling `on.status(status)`, `on.progress({step, total, eta_s})`,
   * `on.preview({step, image})` as things happen; resolves with the final prediction. Uses the progress
   * stream, and polls GET prediction where the server has no stream route (404/405) or the stream breaks.
   */
  async follow(id, on, signal) {
    try {
      const done = await this.stream(id, on, signal);
      if (done) return done;
    } catch (err) {
      if (err.name === "AbortError") throw err;
      if (err instanceof ApiError && err.status === 401) throw err;
      // anything else: fall back to polling, which reports a real problem (an unknown id, say) itself
    }
    return this.poll(id, on, signal);
  }

  /** The stream's final prediction, or null where there is no stream route or it ended early. */
  async stream(id, on, signal) {
    const url = `/api/v1/model/prediction/${encodeURIComponent(id)}/stream?previews=true`;
    const response = await fetch(url, { headers: this.headers({ Accept: "text/event-stream" }), signal });
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok || !type.startsWith("text/event-stream") || !response.body) {
      if (response.status === 401) throw new ApiError(401, "invalid or revoked API key");
      return null;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = parseEvent(block);
        if (!event) continue;
        if (event.name === "done") {
          reader.cancel().catch(() => {});
          return event.data;
        }
        if (event.name === "status") on.status?.(event.data.status);
        else if (event.name === "progress") on.progress?.(event.data);
        else if (event.name === "preview") on.preview?.(event.data);
      }
    }
  }

  async poll(id, on, signal) {
    let last = null;
    for (;;) {
      const pred = await this.prediction(id, signal);
      if (pred.status !== last) {
        last = pred.status;
        on.status?.(pred.status);
      }
      if (isTerminal(pred.status)) return pred;
      if (pred.progress) on.progress?.(pred.progress);
      await sleep(pred.status === "processing" ? 400 : 700, signal);
    }
  }
}

/** One server-sent event block -> {name, data} (data parsed as JSON), or null for comments. */
export function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    return { name, data: JSON.parse(data.join("\n")) };
  } catch {
    return null;
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new DOMException("aborted", "AbortError"));
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

/** A random Idempotency-Key (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
