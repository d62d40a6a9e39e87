// Log in: POST the credentials as JSON; the node answers with an HttpOnly session cookie.
const form = document.querySelector("#login-form");
const error = document.querySelector("#login-error");

function nextPage() {
  // Only a path on this site: never an absolute or protocol-relative URL.
  const next = new URLSearchParams(window.location.search).get("next") || "/";
  return next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/\\") ? next : "/";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  const rsp = await fetch("/api/v1/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      username: document.querySelector("#username").value,
      password: document.querySelector("#password").value,
    }),
  });
  if (rsp.ok) {
    window.location.assign(nextPage());
    return;
  }
  error.textContent = rsp.status === 429
    ? `Too many attempts; try again in ${rsp.headers.get("Retry-After")} s.`
    : "Unknown user or wrong password.";
  error.hidden = false;
});
