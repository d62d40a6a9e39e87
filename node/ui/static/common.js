// Shared by every page: the session's CSRF token, API calls, and the header's log-out button.
// The session cookie is HttpOnly and goes along by itself (same origin); state-changing
// calls add the CSRF token the server rendered into <meta name="csrf-token">.
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const csrfToken = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "" : String(value);
  if (cls) el.className = cls;
  return el;
}

function toLogin() {
  const next = window.location.pathname + window.location.search;
  window.location.assign("/login?next=" + encodeURIComponent(next));
}

class ApiError extends Error {
  constructor(status, detail, body) {
    super(detail);
    this.status = status;
    this.body = body;
  }
}

// JSON in and out. Throws ApiError (with the server's `detail`) on a non-2xx answer.
async function api(path, options = {}) {
  const method = options.method || "GET";
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrfToken();
  let body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const rsp = await fetch(path, { method, headers, body, credentials: "same-origin" });
  if (rsp.status === 401) { toLogin(); throw new ApiError(401, "not logged in"); }
  const data = rsp.status === 204 ? null : await rsp.json().catch(() => null);
  if (!rsp.ok) {
    const detail = data && (data.detail || data.reason);
    throw new ApiError(rsp.status, typeof detail === "string" ? detail : `${path}: HTTP ${rsp.status}`, data);
  }
  return data;
}

const logout = $("#logout");
if (logout) {
  logout.addEventListener("click", async () => {
    await api("/api/v1/session", { method: "DELETE" }).catch(() => {});
    window.location.assign("/login");
  });
}
