// Shared by the UI pages: the session (cookie + CSRF token), API calls, and the header.
const $ = (sel) => document.querySelector(sel);
const session = { csrf: "", role: "", permissions: [] };

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) el.className = cls;
  return el;
}

function toLogin() {
  window.location.assign("/login");
}

// The session cookie goes along by itself (same origin); state-changing calls add the CSRF token.
async function api(path, options = {}) {
  const method = options.method || "GET";
  const headers = method === "GET" ? {} : { "X-CSRF-Token": session.csrf };
  const rsp = await fetch(path, { method, headers });
  if (rsp.status === 401) { toLogin(); throw new Error("not logged in"); }
  if (!rsp.ok) throw new Error(path + ": " + rsp.status);
  return rsp.status === 204 ? null : rsp.json();
}

async function startSession() {
  const me = await api("/api/v1/session");
  session.csrf = me.csrf_token || "";
  session.role = me.role;
  session.permissions = me.permissions;
  $("#who").textContent = `${me.name} (${me.role})`;
  $("#logout").hidden = false;
  const audit = $("#audit-link");
  if (audit) audit.hidden = !me.permissions.includes("admin");
  return me;
}

$("#logout").addEventListener("click", async () => {
  await api("/api/v1/session", { method: "DELETE" }).catch(() => {});
  toLogin();
});
